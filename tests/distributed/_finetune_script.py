"""2-rank ZeRO-3 fine-tuning check, built as the trainer builds it (frozen HF LLM loaded straight into
partitions, then the engine): for every parameter its ZeRO-3 shard, whether the optimizer holds an fp32
master of it, and whether it changed over 3 steps; plus the lr scales of the optimizer's groups.

usage: torchrun --nproc_per_node 2 tests/distributed/_finetune_script.py CONFIG.yaml REPORT.json
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
from blip_train.distributed.zero import gathered, hf_zero3_loading
from blip_train.models.llm_bridge import llm_dtype
from blip_train.training.engine import apply_lr_, build_ds_config, build_engine
from blip_train.training.seeding import seed_everything
from blip_train.training.stages import build_stage


def snapshot(module) -> dict:
    params = list(module.named_parameters())
    with gathered([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def main():
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    cfg = load_config(sys.argv[1])
    env = discover_environment()
    export_environment(env)
    init_distributed(env, 5)
    ds_config = build_ds_config(cfg, env.world_size, on_cuda=False)
    hf_zero3 = None
    if cfg.model.arch != "stage1":
        hf_zero3 = hf_zero3_loading(ds_config, True, dtype=llm_dtype(cfg.model.llm.dtype, "cpu"))  # noqa: F841
    stage = build_stage(cfg, build_world_info(), on_cuda=False)
    engine, _ = build_engine(stage.model, cfg, env.world_size, on_cuda=False, ds_config=ds_config)
    seed_everything(cfg.run.seed, env.rank)
    module = engine.module
    before = snapshot(module)
    # A bf16 working copy near 1.0 may not move in 3 small steps; its fp32 master does.
    masters0 = {n: safe_get_local_fp32_param(p).clone() for n, p in module.named_parameters() if p.requires_grad}
    it = iter(stage.build_train_loader())
    engine.train()
    for step in range(3):
        apply_lr_(engine.optimizer, step, cfg)
        losses = engine(finish_batch(next(it)))
        engine.backward(losses["loss"])
        engine.step()
    after = snapshot(module)
    params = {}
    for n, p in module.named_parameters():
        master = safe_get_local_fp32_param(p) if p.requires_grad else None
        exp_avg = safe_get_local_optimizer_state(p, "exp_avg") if p.requires_grad else None
        params[n] = {"ds_id": hasattr(p, "ds_id"), "ds_numel": int(getattr(p, "ds_numel", -1)),
                     "shard": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else -1,
                     "local_numel": p.numel(), "dtype": str(p.dtype), "requires_grad": p.requires_grad,
                     "master_dtype": None if master is None else str(master.dtype),
                     "master_numel": None if master is None else master.numel(),
                     "optimizer_state": exp_avg is not None and bool(exp_avg.abs().sum() > 0),
                     "changed": not torch.equal(before[n], after[n]),
                     "master_changed": master is not None and not torch.equal(masters0[n], master)}
    rep = {"params": params, "train_mode": module.visual_encoder.training,
           "lr_scales": sorted({g["lr_scale"] for g in engine.optimizer.param_groups}),
           "group_lrs": sorted((g["lr_scale"], g["lr"]) for g in engine.optimizer.param_groups)}
    out = [None] * env.world_size
    dist.all_gather_object(out, rep)
    if env.rank == 0:
        json.dump({"ranks": out}, open(sys.argv[2], "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
