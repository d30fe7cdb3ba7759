"""2-rank check of BLIP's momentum encoders under a real DeepSpeed engine.

After one optimizer step, `update_momentum_` must give, gathered, exactly decay * m + (1 - decay) * master for
every copy (master: the online parameter's fp32 master, or its working copy under ZeRO-0/1/2), also for copies
that DeepSpeed keeps whole (persistence threshold); the feature queue must be the same on every rank and hold
the gathered momentum features; `momentum_state` files are written for a 1-process reload.

usage: torchrun --nproc_per_node N tests/distributed/_momentum_script.py CONFIG.yaml OUT_DIR [KEY=VALUE ...]
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from blip_train.config import load_config
from blip_train.data.device import finish_batch
from blip_train.distributed.env import discover_environment, export_environment
from blip_train.distributed.process_group import init_distributed
from blip_train.distributed.world import build_world_info
from blip_train.distributed.zero import gathered, is_zero3_param
from blip_train.training.engine import apply_lr_, build_ds_config, build_engine
from blip_train.training.momentum import momentum_state, update_momentum_
from blip_train.training.stages import build_stage


def gather_copies(module) -> dict:
    """Every copy whole. Copies DeepSpeed keeps whole (persistent) are read as they are, not gathered: leaving a
    gathered context would release them, and what is checked is that the update kept their whole data right."""
    names = {id(m): n for n, m in module.named_parameters()}
    copies = [m for _, m in module.momentum_pairs()]
    with gathered([m for m in copies if not m.data.numel()]):
        return {names[id(m)]: m.detach().clone() for m in copies}


def masters(module) -> dict:
    """Each online parameter's fp32 master (ZeRO-3), or its working copy (ZeRO-0/1/2), whole."""
    from deepspeed.utils import safe_get_full_fp32_param
    names = {id(m): n for n, m in module.named_parameters()}
    out = {}
    for p, m in module.momentum_pairs():
        if is_zero3_param(p):
            out[names[id(m)]] = safe_get_full_fp32_param(p).detach().clone()  # a collective
        else:
            out[names[id(m)]] = p.detach().to(m.dtype).clone()
    return out


def main():
    config, out = sys.argv[1], Path(sys.argv[2])
    cfg = load_config(config, sys.argv[3:])
    env = discover_environment()
    export_environment(env)
    init_distributed(env, 5)
    ds_config = build_ds_config(cfg, env.world_size, on_cuda=False)
    stage = build_stage(cfg, build_world_info(), on_cuda=False, ds_config=ds_config)
    engine, _ = build_engine(stage.model, cfg, env.world_size, on_cuda=False, ds_config=ds_config)
    module = engine.module
    it = iter(stage.build_train_loader())
    decay = cfg.model.momentum.decay
    ok, worst = True, 0.0
    for step in range(2):
        apply_lr_(engine.optimizer, step, cfg)
        module.train_step = step
        losses = engine(finish_batch(next(it)))
        engine.backward(losses["loss"])
        engine.step()
        whole = sum(int(m.data.numel() > 0) for _, m in module.momentum_pairs())  # persistent: whole after the step
        before, master = gather_copies(module), masters(module)
        update_momentum_(module, decay)
        after = gather_copies(module)
        for n in after:
            expected = before[n].mul(decay).add(master[n], alpha=1 - decay)
            worst = max(worst, (after[n] - expected).abs().max().item())
            ok = ok and torch.equal(after[n], expected)
        moved = sum(int(not torch.equal(before[n], after[n])) for n in after)
    queue = {n: b.clone() for n, b in module.named_buffers() if n.startswith("queue.")}
    queues = [None] * env.world_size
    dist.all_gather_object(queues, {n: b.tolist() for n, b in queue.items()})
    torch.save({"momentum": momentum_state(module)}, out / f"rank_{env.rank:05d}.pt")  # as in a checkpoint
    final = gather_copies(module)
    if env.rank == 0:
        torch.save(final, out / "copies.pt")
        json.dump({"exact": ok, "worst": worst, "moved": moved, "copies": len(after), "whole": whole,
                   "zero3": sum(int(is_zero3_param(m)) for _, m in module.momentum_pairs()),
                   "dtypes": sorted({str(v.dtype) for v in after.values()}),
                   "queues_equal": all(q == queues[0] for q in queues),
                   "ptr": queues[0]["queue.ptr"]}, open(out / "report.json", "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
