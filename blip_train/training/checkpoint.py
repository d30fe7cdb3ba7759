"""Checkpoints as a contract: what is saved, when a checkpoint counts as complete, what resume reads.

Layout under `<run.output_dir>/checkpoints/`:
    step_0001200/                DeepSpeed's own files (model/optimizer shards, scheduler, client state)
    step_0001200/rank_00001.pt   per-rank trainer state: RNG streams, data position, step counters
    step_0001200/complete.json   written by rank 0 only after EVERY rank finished writing (a barrier)
    latest                       the tag of the newest complete checkpoint, replaced atomically

A checkpoint without `complete.json` was interrupted mid-write: resume ignores it and uses the newest
complete one. DeepSpeed's own `latest` is not used: it is written by rank 0 before the other ranks'
shards are known to be on disk.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "complete.json"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{7,})$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(tag: str) -> int:
    m = _TAG.match(tag)
    if not m:
        raise ValueError(f"not a checkpoint tag: {tag!r} (expected step_NNNNNNN)")
    return int(m.group(1))


@dataclass
class TrainState:
    """Counters of the loop that a resume must restore."""
    step: int = 0
    samples_seen: int = 0
    bad_steps_total: int = 0
    extra: dict = field(default_factory=dict)


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def list_complete(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name) and is_complete(p)]
    return sorted(tags, key=step_of)


def find_resume_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint: `latest` if it names a complete one, else the highest complete step."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if _TAG.match(tag) and is_complete(ckpt_dir / tag):
            complete = list_complete(ckpt_dir)
            if complete and step_of(complete[-1]) > step_of(tag):
                return complete[-1]
            return tag
    complete = list_complete(ckpt_dir)
    return complete[-1] if complete else None


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / COMPLETE).read_text())


def save_checkpoint(engine: Any, ckpt_dir: Path, state: TrainState, data_state: dict | None,
                    meta: dict, keep_last: int, keep_every: int) -> str:
    """Save on every rank; mark complete and move `latest` only once all ranks are done."""
    tag = tag_for(state.step)
    rank = _rank()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    client = {"train_state": asdict(state), "data": data_state}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    tmp = rank_file.with_name(f".{rank_file.name}.tmp")
    torch.save({"rng": capture_rng_state(), "train_state": asdict(state), "data": data_state}, tmp)
    os.replace(tmp, rank_file)
    _barrier()  # every rank's shards and rank file are on disk past this point
    if rank == 0:
        info = dict(meta, tag=tag, step=state.step, world_size=_world(), saved_at=time.time(),
                    save_seconds=round(time.time() - t0, 3))
        _atomic_write(ckpt_dir / tag / COMPLETE, json.dumps(info, indent=1))
        _atomic_write(ckpt_dir / LATEST, tag)
        apply_retention(ckpt_dir, keep_last, keep_every)
    _barrier()
    return tag


def apply_retention(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[str]:
    """Delete old complete checkpoints beyond the newest `keep_last`, except multiples of `keep_every`.

    Incomplete tag folders older than the newest complete one are leftovers of a killed save: removed too.
    """
    complete = list_complete(ckpt_dir)
    keep = set(complete[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {t for t in complete if step_of(t) % keep_every == 0}
    newest = step_of(complete[-1]) if complete else -1
    removed = []
    for p in ckpt_dir.iterdir():
        if not (p.is_dir() and _TAG.match(p.name)):
            continue
        stale_partial = not is_complete(p) and step_of(p.name) < newest
        if (is_complete(p) and p.name not in keep) or stale_partial:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return sorted(removed)


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str, load_optimizer: bool = True) -> tuple[TrainState, dict | None]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG/data state. Same world size only."""
    meta = read_meta(ckpt_dir / tag)
    if meta["world_size"] != _world():
        raise RuntimeError(
            f"{ckpt_dir / tag}: saved with {meta['world_size']} ranks, resuming on {_world()}; convert it first with "
            f"`python tools/make_universal.py --checkpoint {ckpt_dir.parent}` (elastic resume)")
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rank_state = torch.load(ckpt_dir / tag / f"rank_{_rank():05d}.pt", weights_only=False)
    restore_rng_state(rank_state["rng"])
    state = TrainState(**rank_state["train_state"])
    return state, rank_state["data"]
