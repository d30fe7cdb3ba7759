"""What a model needs to know about the other ranks, passed in from outside.

Models never import torch.distributed: the trainer builds a `WorldInfo` (see
`blip_train.distributed.world.build_world_info`) and hands it to the model. The default is one rank, so the
same loss code runs unchanged in single-process tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def _detached(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class WorldInfo:
    rank: int = 0
    size: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] = field(default=_detached)
    """Concatenate a tensor from all ranks along dim 0, rank order, WITHOUT gradient (also on one rank)."""
    gather_with_grad: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)
    """Concatenate along dim 0 with gradient flowing back to the rank that owns each slice."""
