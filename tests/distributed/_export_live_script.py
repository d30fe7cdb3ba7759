"""2-rank run that keeps its engine alive past the checkpoint: trains 2 steps, saves a checkpoint through
the checkpoint contract, and writes what the LIVE engine holds (every parameter gathered) to LIVE.pt.

usage: torchrun --nproc_per_node 2 tests/distributed/_export_live_script.py CONFIG.yaml LIVE.pt
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from blip_train.config import load_config, save_resolved_config
from blip_train.data.device import finish_batch
from blip_train.distributed.env import discover_environment, export_environment
from blip_train.distributed.process_group import init_distributed
from blip_train.distributed.world import build_world_info
from blip_train.distributed.zero import gathered
from blip_train.training.checkpoint import TrainState, save_checkpoint
from blip_train.training.engine import apply_lr_, build_engine
from blip_train.training.stages import build_stage


def main():
    cfg = load_config(sys.argv[1])
    env = discover_environment()
    export_environment(env)
    init_distributed(env, 5)
    run_dir = Path(cfg.run.output_dir)
    if env.rank == 0:
        save_resolved_config(cfg, run_dir / "config.yaml")
    stage = build_stage(cfg, build_world_info(), on_cuda=False)
    engine, _ = build_engine(stage.model, cfg, env.world_size, on_cuda=False)
    it = iter(stage.build_train_loader())
    for step in range(2):
        apply_lr_(engine.optimizer, step, cfg)
        losses = engine(finish_batch(next(it)))
        engine.backward(losses["loss"])
        engine.step()
    save_checkpoint(engine, run_dir / "checkpoints", TrainState(step=2), None,
                    {"arch": cfg.model.arch, "frozen_sources": stage.frozen_sources}, keep_last=3, keep_every=0)
    params = list(engine.module.named_parameters())
    with gathered([p for _, p in params]):
        live = {"trainable": {n: p.detach().clone() for n, p in params if p.requires_grad},
                "frozen": {n: p.detach().clone() for n, p in params if not p.requires_grad}}
    if env.rank == 0:
        torch.save(live, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
