"""2-rank check: ZeRO-3 really partitions (threshold 0), frozen weights never change or get grads.

usage: torchrun --nproc_per_node 2 tests/distributed/_train_checks_script.py CONFIG.yaml REPORT.json
"""
import json
import sys

import torch
import torch.distributed as dist

from blip_train.config import load_config
from blip_train.data.device import finish_batch
from blip_train.distributed.env import discover_environment, export_environment
from blip_train.distributed.process_group import init_distributed
from blip_train.distributed.world import build_world_info
from blip_train.distributed.zero import gathered
from blip_train.training.engine import apply_lr_, build_ds_config, build_engine
from blip_train.training.stages import build_stage


def snapshot(module, frozen: bool) -> dict:
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad != frozen]
    with gathered([p for _, p in params]):
        return {n: p.detach().float().clone() for n, p in params}


def main():
    cfg = load_config(sys.argv[1])
    env = discover_environment()
    export_environment(env)
    init_distributed(env, 5)
    ds_config = build_ds_config(cfg, env.world_size, on_cuda=False)
    stage = build_stage(cfg, build_world_info(), on_cuda=False, ds_config=ds_config)  # the ViT built partitioned
    engine, _ = build_engine(stage.model, cfg, env.world_size, on_cuda=False, ds_config=ds_config)
    module = engine.module
    frozen0, train0 = snapshot(module, True), snapshot(module, False)
    loader = stage.build_train_loader()
    it = iter(loader)
    frozen_with_grad = set()
    for step in range(3):
        apply_lr_(engine.optimizer, step, cfg)
        losses = engine(finish_batch(next(it)))
        engine.backward(losses["loss"])
        for n, p in module.named_parameters():
            if not p.requires_grad and p.grad is not None:
                frozen_with_grad.add(n)
        engine.step()
    frozen1, train1 = snapshot(module, True), snapshot(module, False)
    shards = {n: (int(p.ds_numel), int(p.ds_tensor.numel())) for n, p in module.named_parameters()}
    unpartitioned = [n for n, p in module.named_parameters() if p.numel() != 0]
    rep = {"shards": shards, "unpartitioned": unpartitioned,
           "frozen_changed": [n for n in frozen0 if not torch.equal(frozen0[n], frozen1[n])],
           "frozen_with_grad": sorted(frozen_with_grad),
           "trainable_changed": sum(not torch.equal(train0[n], train1[n]) for n in train0)}
    out = [None] * env.world_size
    dist.all_gather_object(out, rep)
    if env.rank == 0:
        json.dump({"ranks": out}, open(sys.argv[2], "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
