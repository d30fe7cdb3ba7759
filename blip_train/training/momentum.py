"""Momentum encoders under ZeRO: moved shard by shard after each step, saved and restored with the checkpoint.

A model with momentum copies (ALBEF / BLIP, `model.momentum_pairs()`) keeps them as frozen fp32 parameters:
no optimizer state, partitioned by ZeRO-3 like the online model (the same shapes give the same element
ranges to every rank). So the update needs no gather:
- ZeRO-3: each rank moves its own partition of each copy towards the optimizer's fp32 master partition
  of the online parameter (`safe_get_local_fp32_param`). Copies kept whole on every rank (DeepSpeed's
  persistence threshold) are then re-assembled from the updated partitions (one all-gather for all of
  them), so that a copy's whole data and its partition never disagree.
- ZeRO-0/1/2: parameters are whole on every rank; the copy moves towards the working weights (16-bit
  under bf16: the copy then averages the rounded weights, within one bf16 rounding of the average of the
  masters; reading the fp32 masters would cost an all-reduce of the whole model per step).

Checkpoints: the copies are not optimised, so DeepSpeed's files do not hold them. Each rank writes the
element range [r*s, (r+1)*s) of every flattened copy (s = ceil(numel / world), ZeRO-3's partitioning)
into its rank file; rank 0 also writes the model's buffers (the feature queue, identical on every rank).
Resume on any number of ranks re-assembles each tensor from all ranks' files (read memory-mapped).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from blip_train.distributed.zero import is_zero3_param
from blip_train.models.blip_losses import momentum_update_


def has_momentum(model: nn.Module) -> bool:
    return callable(getattr(model, "momentum_pairs", None))


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's flat ZeRO-3 partition of `p`, without the padding of the last rank."""
    rank, world = _rank_world()
    size = math.ceil(p.ds_numel / world)
    valid = max(0, min(size, p.ds_numel - rank * size))
    return p.ds_tensor.view(-1)[:valid]


def _regather_whole_(copies: list[torch.Tensor]) -> None:
    """Persistent ZeRO-3 parameters are also whole on every rank: rebuild those copies from the partitions, all
    in one all-gather (hundreds of small tensors at the default persistence threshold: one collective each
    would cost more in latency than in bytes)."""
    if not copies:
        return
    _, world = _rank_world()
    sizes = [m.ds_tensor.numel() for m in copies]  # each copy's padded partition, the same on every rank
    mine = torch.cat([m.ds_tensor.view(-1) for m in copies])  # (S,) fp32: every copy's partition, in order
    parts = torch.empty(world * mine.numel(), dtype=mine.dtype, device=mine.device)
    dist.all_gather_into_tensor(parts, mine)
    parts = parts.view(world, -1)  # (W, S): row r is rank r's partitions
    offset = 0
    for m, size in zip(copies, sizes):
        m.data.view(-1).copy_(parts[:, offset:offset + size].reshape(-1)[: m.data.numel()])
        offset += size


@torch.no_grad()
def update_momentum_(model: nn.Module, decay: float) -> None:
    """momentum = decay * momentum + (1 - decay) * online, for every pair of `model.momentum_pairs()`.

    Call on every rank after the optimizer step (ALBEF/BLIP move the copies before each forward: the same
    sequence). Computed in the copy's dtype (fp32).
    """
    from deepspeed.utils import safe_get_local_fp32_param

    pairs, whole_copies = [], []
    for p, m in model.momentum_pairs():
        if is_zero3_param(m):
            # A frozen online parameter (one the fine-tuning objective does not read) has no fp32 master: its
            # partition is the value.
            online = safe_get_local_fp32_param(p) if p.requires_grad and hasattr(p, "_z3_optimizer") else p.ds_tensor
            mine = _local(m)
            pairs.append((online.view(-1)[: mine.numel()], mine))
            if m.data.numel():
                whole_copies.append(m)
        else:
            pairs.append((p.data, m.data))
    momentum_update_(pairs, decay)
    _regather_whole_(whole_copies)


def _slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    numel = t.ds_numel if is_zero3_param(t) else t.numel()
    size = math.ceil(numel / world)
    if is_zero3_param(t):
        return _local(t).clone()
    return t.detach().reshape(-1)[rank * size: min(numel, (rank + 1) * size)].clone()


def momentum_state(model: nn.Module) -> dict:
    """This rank's part of the momentum copies (and, on rank 0, the model's buffers), for its rank file."""
    rank, world = _rank_world()
    params = {name: _slice(m, rank, world) for name, m in _named_copies(model)}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if rank == 0 else {}
    return {"world_size": world, "params": params, "buffers": buffers}


def _named_copies(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    ids = {id(m) for _, m in model.momentum_pairs()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


@torch.no_grad()
def load_momentum_state_(model: nn.Module, tag_dir: Path) -> None:
    """Restore the momentum copies and buffers from every rank file of `tag_dir`, at any world size."""
    first = torch.load(tag_dir / "rank_00000.pt", map_location="cpu", weights_only=False, mmap=True)
    saved_world = first["momentum"]["world_size"]
    states = [first["momentum"]] + [
        torch.load(tag_dir / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False, mmap=True)["momentum"]
        for r in range(1, saved_world)]
    rank, world = _rank_world()
    copies = dict(_named_copies(model))
    missing = sorted(set(copies) - set(first["momentum"]["params"]))
    if missing:
        raise RuntimeError(f"{tag_dir}: the checkpoint has no momentum copy of {missing[:3]} (another model?)")
    for name, m in copies.items():
        flat = torch.cat([s["params"][name] for s in states])  # (numel,) in rank order
        if is_zero3_param(m):
            size = math.ceil(m.ds_numel / world)
            mine = _local(m)
            mine.copy_(flat[rank * size: rank * size + mine.numel()])
            if m.data.numel():
                m.data.view(-1).copy_(flat)
        else:
            m.data.view(-1).copy_(flat)
    own = dict(model.named_buffers())
    for name, value in first["momentum"]["buffers"].items():
        if name not in own:
            raise RuntimeError(f"{tag_dir}: buffer {name} has no place in the model")
        own[name].copy_(value)
