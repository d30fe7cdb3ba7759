"""The process group: created once from a `DistEnv`, plus the few collectives the trainer needs.

Every helper also works with no process group at all (a single-process run or a unit test), so
callers never branch on "am I distributed?".
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from blip_train.distributed.env import DistEnv, export_environment, select_cuda_device


def init_distributed(env: DistEnv, timeout_minutes: int, on_cuda: bool | None = None) -> None:
    """Create the default process group through DeepSpeed (gloo on CPU, nccl on CUDA).

    `on_cuda` False on a machine with GPUs (run.device=cpu) keeps DeepSpeed on its CPU accelerator:
    left alone it would pick CUDA and NCCL. Idempotent: a second call with a group alive does nothing.
    """
    if dist.is_available() and dist.is_initialized():
        return
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    if not on_cuda and torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # read once, when DeepSpeed first picks its accelerator
    import deepspeed  # deferred: importing deepspeed costs seconds and is useless to the helpers below
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != ("cuda" if on_cuda else "cpu"):
        raise RuntimeError(f"run.device: this run is on {'cuda' if on_cuda else 'cpu'} but DeepSpeed already chose "
                           f"its {get_accelerator().device_name()} accelerator (set DS_ACCELERATOR before it starts)")
    # DeepSpeed reads the env:// variables; missing ones would send it looking for mpi4py.
    export_environment(env)
    if on_cuda:
        # NCCL binds a communicator to the current device, so pick it before the group exists; LOCAL_RANK
        # follows, since DeepSpeed sets its own device from it (see `select_cuda_device`).
        torch.cuda.set_device(select_cuda_device(env, torch.cuda.device_count()))
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(minutes=timeout_minutes), rank=env.rank,
                               world_size=env.world_size)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    """True when collectives must actually talk to other ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only, flushed so SLURM logs interleave in order."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if _active():
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors must live for the default group: NCCL only moves CUDA tensors, gloo CPU ones."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max_bool(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a stop request)."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, returned as a new tensor on the input's device (the input is not modified).

    Integer tensors come back as float32, since a mean of integers is not an integer.
    """
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if not _active():
        return out
    # SUM then divide rather than ReduceOp.AVG: gloo implements no AVG.
    buf = out.to(collective_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / dist.get_world_size()).to(tensor.device)


def describe_placement(env: DistEnv) -> str:
    """Where the ranks run, as one line for the log, e.g. `world: 16 ranks on 2 nodes (slurm): gpu-a [0-7],
    gpu-b [8-15]`: a layout other than the one the job asked for shows at start. A node is SLURMD_NODENAME under
    SLURM (several nodes may share one host), else the host name. A collective: every rank calls it."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    names: list = [node]
    if _active():
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, node)
    ranks: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        ranks.setdefault(name, []).append(rank)
    where = ", ".join(f"{name} [{_spans(r)}]" for name, r in ranks.items())
    return (f"world: {len(names)} rank{'s' * (len(names) > 1)} on {len(ranks)} node{'s' * (len(ranks) > 1)} "
            f"({env.launcher}): {where}")


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
