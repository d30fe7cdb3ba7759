"""Real gather functions for `WorldInfo`, the only door through which models see other ranks.

Both gathers concatenate along dim 0 in rank order and need the same shape on every rank (the
loader drops the last partial batch). The ITC loss uses them as in BLIP-2: features of the other
ranks' samples become extra negatives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from blip_train.models.world import WorldInfo


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()  # collectives need contiguous buffers
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)  # (world * B, ...)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of `x` from all ranks, detached: other ranks' slices are constants."""
    with torch.no_grad():
        return _all_gather_cat(x.detach())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient of its own slice, summed over ranks.

    Every rank computes a loss on the full gathered tensor, so rank r's slice receives gradient from
    every rank's loss: sum the incoming gradients over ranks, then keep our slice. We all-reduce the
    full gradient instead of reduce-scattering it because gloo has no reduce-scatter; the tensors are
    small (B x embed_dim features), so the extra traffic does not matter.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd's buffer is not ours to modify
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]  # (B, ...)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of `x` from all ranks; gradients flow back to the rank that owns each slice."""
    return _GatherWithGrad.apply(x)


def build_world_info() -> WorldInfo:
    """WorldInfo for the current process group; the one-rank default when there is none (or one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return WorldInfo()
    return WorldInfo(rank=dist.get_rank(), size=dist.get_world_size(), gather=gather_no_grad,
                     gather_with_grad=gather_with_grad)
