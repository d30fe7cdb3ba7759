"""Run under torchrun (2 ranks, gloo): WorldInfo gathers, collective helpers and ZeRO-3 helpers.

Each rank writes what it computed to OUT_DIR/rank{r}.json; the parent test compares the gathers with
the single-process computation on the concatenated input.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn

from blip_train.distributed import (all_reduce_max_bool, all_reduce_mean, barrier, build_world_info, destroy_distributed,
                             discover_environment, full_numel, gathered, init_distributed, is_zero3_param,
                             maybe_zero_init)

B, D = 3, 4
ZERO3 = {"train_micro_batch_size_per_gpu": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def rank_input(rank: int) -> torch.Tensor:
    """Rank r's local features; the parent rebuilds all of them."""
    return torch.randn(B, D, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)


def rank_loss(gathered_x: torch.Tensor, rank: int) -> torch.Tensor:
    """A rank-dependent, nonlinear loss of the whole gathered batch, so every slice gets a distinct gradient."""
    weights = torch.arange(gathered_x.numel(), dtype=torch.float64).reshape(gathered_x.shape) * (rank + 1)
    sim = gathered_x @ gathered_x.T  # (2B, 2B)
    return (weights * torch.tanh(gathered_x)).sum() + (rank + 0.5) * sim.pow(2).sum()


def check_zero(out: dict) -> None:
    with maybe_zero_init(True, ZERO3):
        layer = nn.Linear(D, 3)
    out["zero3_param"] = is_zero3_param(layer.weight)
    out["local_numel"] = layer.weight.numel()
    out["full_numel"] = full_numel(layer.weight)
    with gathered(layer, modifier_rank=0), torch.no_grad():
        out["gathered_shape"] = list(layer.weight.shape)
        if torch.distributed.get_rank() == 0:
            layer.weight.fill_(1.5)  # only rank 0's write must survive
        else:
            layer.weight.fill_(-7.0)
    with gathered(layer.weight):
        out["after_modify"] = sorted(set(layer.weight.flatten().tolist()))
    with maybe_zero_init(False, ZERO3):
        plain = nn.Linear(D, 3)
    with gathered(plain):  # no-op for unpartitioned parameters
        out["plain"] = [is_zero3_param(plain.weight), full_numel(plain.weight)]
    # Release the partitioned module while the process group is alive: freeing it during interpreter
    # shutdown, after the group is gone, can abort the process ("terminate called ...").
    del layer
    gc.collect()


def main(out_dir: Path) -> None:
    env = discover_environment()
    init_distributed(env, timeout_minutes=2)
    info = build_world_info()
    x = rank_input(env.rank).requires_grad_(True)
    out: dict = {"rank": info.rank, "size": info.size, "launcher": env.launcher,
                 "local_world_size": env.local_world_size}

    g = info.gather(x)
    out["gather"] = g.tolist()
    out["gather_requires_grad"] = g.requires_grad

    gx = info.gather_with_grad(x)
    loss = rank_loss(gx, env.rank)
    loss.backward()
    out["gather_with_grad"] = gx.tolist()
    out["grad"] = x.grad.tolist()

    out["mean"] = all_reduce_mean(torch.tensor([float(env.rank), 10.0])).tolist()
    out["any_rank1"] = all_reduce_max_bool(env.rank == 1)
    out["any_none"] = all_reduce_max_bool(False)
    check_zero(out)
    barrier()
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(out))
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
