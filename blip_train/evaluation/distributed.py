"""How evaluation uses devices and ranks: where the model runs, how work is dealt, how results meet.

* Placement: standalone evaluation runs where training would (`run.device`), on `cuda:LOCAL_RANK`.
* Work is dealt in whole batches, round-robin (batch b to rank b % world), so an item is computed in
  the same batch at any world size: kernels may round differently for another batch composition, and
  2 ranks must give exactly the 1-rank numbers.
* Lockstep: with ZeRO-3 weights partitioned over ranks (in-training evaluation) every module call is
  a collective, so every rank must make the same number of calls in the same order. A rank with less
  work repeats a call and discards its result.
* Gathers run on the default group's device (NCCL moves CUDA tensors only, gloo CPU ones).
* Progress: standalone evaluation shows rank 0's share of the batches as tqdm bars on stderr.
"""
from __future__ import annotations

import math
import sys
from typing import Iterable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from blip_train.config import ConfigError
from blip_train.distributed.process_group import collective_device

T = TypeVar("T")


def pick_eval_device(run_device: str, local_rank: int, cuda_devices: int) -> torch.device:
    """The device standalone evaluation runs on, decided as training decides it.

    run_device: `run.device` (auto | cpu | cuda); cuda_devices: CUDA devices this process sees (0 when
    CUDA is unavailable). On CUDA the device is the one `init_distributed` binds NCCL to (local rank
    modulo the visible devices: with `--gpus-per-task=1` each task sees one GPU, index 0).
    """
    if run_device == "cuda" and cuda_devices == 0:
        raise ConfigError("run.device: cuda, but no CUDA device is available (set run.device=auto or cpu)")
    if run_device == "cpu" or cuda_devices == 0:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % cuda_devices)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def plan_batches(num_items: int, batch_size: int, rank: int, world: int,
                 lockstep: bool = False) -> list[tuple[range, bool]]:
    """This rank's share of items 0..num_items-1 as [(batch, keep)], batch b = [b*batch_size, (b+1)*batch_size).

    Batch b goes to rank b % world (keep=True). lockstep=True appends repeats of a batch (keep=False:
    run it, discard the result) until the rank has ceil(#batches / world) batches, as every rank has then.
    """
    batches = [range(i, min(i + batch_size, num_items)) for i in range(0, num_items, batch_size)]
    mine = [(b, True) for b in batches[rank::world]]
    if lockstep and batches:
        filler = mine[-1][0] if mine else batches[0]
        mine += [(filler, False)] * (math.ceil(len(batches) / world) - len(mine))
    return mine


def all_gather_rows(local: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's `local` (row counts may differ; other dimensions and dtype must agree) in rank order,
    on `local`'s device. Sent on the collective's device, padded to the longest."""
    if world == 1:
        return [local]
    device = collective_device()
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [p[:n].to(local.device) for p, n in zip(parts, sizes)]


def all_gather_objects(obj: object, world: int) -> list:
    """Every rank's `obj` (picklable, no tensors) in rank order; [obj] on one rank."""
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def in_rank_order(parts: Sequence[torch.Tensor], plans: Sequence[Sequence[int]], total: int) -> torch.Tensor:
    """Rows gathered from ranks (`parts[r]` holds rows `plans[r]`, in that order) put back as rows 0..total-1."""
    out = torch.cat(list(parts))
    order = torch.from_numpy(np.concatenate([np.asarray(plan, dtype=np.int64) for plan in plans]))
    if order.numel() != total or not torch.equal(order.sort().values, torch.arange(total)):
        raise RuntimeError(f"gathered rows {order.numel()} do not cover 0..{total - 1} exactly once")
    result = torch.empty_like(out)
    result[order.to(out.device)] = out
    return result


def progress_bar(work: Sequence[T], desc: str, enabled: bool) -> Iterable[T]:
    """`work` (this rank's batches or calls), iterated under a tqdm bar on stderr when `enabled`, on rank 0.

    Off inside training: `train.log` mirrors stderr and a bar's redraws would fill it (each in-training
    evaluation prints one line when done). Into a file (a SLURM log) the bar is redrawn every 30 s at most.
    """
    from tqdm import tqdm

    return tqdm(work, desc=desc, unit="batch", file=sys.stderr, disable=not enabled or rank_world()[0] != 0,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
