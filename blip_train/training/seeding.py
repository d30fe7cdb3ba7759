"""Seeding: models are initialised from the run seed on every rank (identical weights), then every
rank draws from a stream of its own (dropout masks, ITM hard negatives), derived from (seed, rank)."""
from __future__ import annotations

import random

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed of its own per (run seed, rank): unlike seed + rank, rank 1 of seed 42 does not
    replay rank 0 of seed 43."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with this rank's own stream of the run seed."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)
