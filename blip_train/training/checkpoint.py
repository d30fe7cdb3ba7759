"""Checkpoints as a contract: what is saved, when a checkpoint counts as complete, what resume reads.

Layout under `<run.output_dir>/checkpoints/`:
    step_0001200/                DeepSpeed's own files (model/optimizer shards, scheduler, client state)
    step_0001200/rank_00001.pt   per-rank trainer state: RNG streams, data position, step counters
    step_0001200/complete.json   written by rank 0 only after EVERY rank finished writing (a barrier)
    latest                       the tag of the newest complete checkpoint, replaced atomically

A checkpoint without `complete.json` was interrupted mid-write: resume ignores it and uses the newest
complete one. DeepSpeed's own `latest` is not used: it is written by rank 0 before the other ranks'
shards are known to be on disk.

`complete.json` lists every file of the checkpoint with its size (`files`). Before a resume, the newest
complete checkpoint is verified against that list (and each torch file's zip directory is read); one
with a missing, truncated or unreadable file is reported in one line naming the file, and the previous
complete checkpoint is used instead. Tools that read a checkpoint (`zero_to_safetensors`, `export_hf`,
`eval`) verify it deeply: every entry of every torch file against the CRC-32 the zip format stores.

Only what trains is saved: the trainable parameters, their optimizer state, scheduler, counters, and
the momentum encoders of ALBEF / BLIP with their feature queue (in the rank files, see training/momentum.py).
Frozen towers (the ViT, the LLM) are left out (a Vicuna-13B tower would add 26 GB to every save) and
always come from their recorded sources: the stage builders load them at the start of every run,
`complete.json` names those sources (`frozen_sources`) and what the left-out tensors were (`frozen`:
dtype, tensor and element counts per tower), and resume states that exactly those keys are missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from blip_train.training.momentum import has_momentum, load_momentum_state_, momentum_state

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


def find_resume_tag(ckpt_dir: Path, verify: bool = False, report: Callable[[str], None] | None = None,
                    deep: bool = False) -> str | None:
    """The newest complete checkpoint (the highest complete step; `latest` names it in a healthy run).

    verify: skip checkpoints that fail `verify_checkpoint` (deep: CRC of every byte), newest first, and
    tell `report` (one line each) which file made a checkpoint unusable; None when none is usable.
    """
    for tag in reversed(list_complete(ckpt_dir)):
        problem = verify_checkpoint(ckpt_dir / tag, deep=deep) if verify else None
        if problem is None:
            return tag
        if report is not None:
            report(f"checkpoint {ckpt_dir / tag} is damaged ({problem}); using the previous complete checkpoint")
    return None


class CheckpointError(RuntimeError):
    """A checkpoint with a missing, truncated or corrupt file; the message names the file."""


def file_manifest(tag_dir: Path) -> dict[str, int]:
    """{path relative to the tag folder: size in bytes} of every file a save wrote (complete.json aside)."""
    return {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*"))
            if f.is_file() and f.name != COMPLETE and not f.name.startswith(".")}


def verify_checkpoint(tag_dir: Path, deep: bool = False) -> str | None:
    """'<file>: <what is wrong>' for the first problem of a complete checkpoint, None when it is whole.

    Every file `complete.json` lists must be there at its recorded size (a checkpoint written before files
    were listed is checked for the per-rank files DeepSpeed writes). Torch files are zip archives: their
    directory must be readable (a truncated file loses it) and, `deep`, every entry must match the CRC-32
    stored beside it (reads every byte).
    """
    meta = read_meta(tag_dir)
    recorded = meta.get("files")
    if recorded is None:  # written before checkpoints listed their files: check what DeepSpeed writes per rank
        problem = _missing_rank_file(tag_dir, int(meta.get("world_size", 1)))
        if problem is not None:
            return problem
        recorded = {name: None for name in file_manifest(tag_dir)}
    for name, size in sorted(recorded.items()):
        f = tag_dir / name
        if not f.is_file():
            return f"{name}: missing"
        actual = f.stat().st_size
        if size is not None and actual != size:
            return f"{name}: {actual:,d} bytes, {size:,d} were written (truncated or overwritten)"
        if f.suffix == ".pt":
            try:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip() if deep else None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                return f"{name}: not a readable torch file ({actual:,d} bytes; {e})"
            if bad is not None:
                return f"{name}: corrupt (entry {bad} fails its CRC-32 check)"
    return None


def _missing_rank_file(tag_dir: Path, world: int) -> str | None:
    """A DeepSpeed shard file missing from a checkpoint saved on `world` ranks (ZeRO-3 and the optimizer
    files: one per rank; ZeRO-1/2 keep one model-states file), as '<file>: missing (...)'."""
    for kind in ("model_states", "optim_states"):
        have = sorted(tag_dir.glob(f"*_{kind}.pt"))
        if not have:
            return f"*_{kind}.pt: missing (no such file in the checkpoint)"
        ranks = {int(m.group(1)) for f in have if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
        missing = sorted(set(range(world)) - ranks) if ranks else []
        if missing:
            name = re.sub(r"zero_pp_rank_\d+_", f"zero_pp_rank_{missing[0]}_", have[0].name)
            return f"{name}: missing ({len(ranks)} of the {world} ranks' {kind} files are there)"
    return None


def require_whole_checkpoint(tag_dir: Path, deep: bool = True) -> None:
    """Raise CheckpointError naming the file when `verify_checkpoint` finds a problem (tools, evaluation)."""
    problem = verify_checkpoint(tag_dir, deep=deep)
    if problem is not None:
        earlier = [t for t in list_complete(tag_dir.parent) if step_of(t) < step_of(tag_dir.name)]
        hint = f"; the previous complete checkpoint is {tag_dir.parent / earlier[-1]}" if earlier else ""
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: {problem}{hint}")


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / COMPLETE).read_text())


def frozen_manifest(model: torch.nn.Module) -> dict:
    """What a checkpoint leaves out: per top-level module, the dtype, tensor count and element count of its
    frozen parameters (partitioned ones counted whole). Recorded in complete.json; tools that rebuild the
    towers from their sources check against it."""
    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        entry = out.setdefault(name.split(".", 1)[0], {"dtype": str(p.dtype).replace("torch.", ""),
                                                        "tensors": 0, "numel": 0})
        entry["tensors"] += 1
        entry["numel"] += int(p.ds_numel) if hasattr(p, "ds_id") else p.numel()
    return out


@contextlib.contextmanager
def _frozen_left_out_of_state_dict(model: torch.nn.Module) -> Iterator[None]:
    """While active, `model.state_dict()` leaves out every name of a frozen parameter, tied aliases too.

    DeepSpeed's `exclude_frozen_parameters` deletes frozen parameters by their first name only, so under
    ZeRO-0/1/2 a tied frozen weight was still saved whole under its alias (OPT's lm_head is its input
    embedding: 257 MB at 2.7B; T5's encoder/decoder embed_tokens are `shared`).
    """
    frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def drop(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name in frozen:
            state_dict.pop(prefix + name, None)

    handle = model.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def save_checkpoint(engine: Any, ckpt_dir: Path, state: TrainState, data_state: dict | None,
                    meta: dict, keep_last: int, keep_every: int) -> str:
    """Save on every rank; mark complete and move `latest` only once all ranks are done.

    Frozen parameters are not written (`exclude_frozen_parameters`): see the module docstring.
    """
    tag = tag_for(state.step)
    rank = _rank()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0 and is_complete(ckpt_dir / tag):
        # Saving again over this step (a resume from an earlier checkpoint after this one was found damaged):
        # while the files are rewritten, nothing may call the folder complete.
        (ckpt_dir / tag / COMPLETE).unlink()
    _barrier()
    t0 = time.time()
    client = {"train_state": asdict(state), "data": data_state}
    with _frozen_left_out_of_state_dict(engine.module):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False,
                               exclude_frozen_parameters=True)
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    tmp = rank_file.with_name(f".{rank_file.name}.tmp")
    rank_state = {"rng": capture_rng_state(), "train_state": asdict(state), "data": data_state}
    if has_momentum(engine.module):  # not optimised, so not in DeepSpeed's files (training/momentum.py)
        rank_state["momentum"] = momentum_state(engine.module)
    torch.save(rank_state, tmp)
    os.replace(tmp, rank_file)
    _barrier()  # every rank's shards and rank file are on disk past this point
    if rank == 0:
        info = dict(meta, tag=tag, step=state.step, world_size=_world(), saved_at=time.time(),
                    save_seconds=round(time.time() - t0, 3), frozen=frozen_manifest(engine.module),
                    files=file_manifest(ckpt_dir / tag))
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
    for p in ckpt_dir.glob(f"step_*{UNIVERSAL_SUFFIX}"):  # conversions of deleted checkpoints
        if not (ckpt_dir / p.name[:-len(UNIVERSAL_SUFFIX)]).is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return sorted(removed)


UNIVERSAL_SUFFIX = "_universal"


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def convert_to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert `tag` into DeepSpeed's world-size-independent format (rank 0 works, all ranks wait).

    Used for elastic resume (a checkpoint saved on N ranks resumed on M). The conversion is written
    to a temporary folder and renamed, so a crash mid-way never leaves a folder that looks usable.
    """
    import subprocess
    import sys

    out = ckpt_dir / universal_tag(tag)
    if _rank() == 0 and not out.is_dir():
        tmp = ckpt_dir / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{ckpt_dir / tag}: universal conversion failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    _barrier()
    return out.name


def load_module_without_frozen_(src: dict, dst: torch.nn.Module) -> None:
    """Module weights of a checkpoint saved without its frozen towers (DeepSpeed's `custom_load_fn`).

    A non-strict load that states what it expects to miss: exactly the frozen parameters (tied aliases
    included), which keep the values the builder loaded from their sources. Any other missing key, or any
    unexpected one, is an error.
    """
    frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not match the model: missing trainable/buffer keys {missing[:5]}, "
                           f"unexpected keys {sorted(result.unexpected_keys)[:5]} (another model.arch or size?)")


def load_checkpoint(engine: Any, ckpt_dir: Path, tag: str, load_optimizer: bool = True,
                    frozen_sources: dict | None = None) -> tuple[TrainState, dict | None]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG/data state.

    Frozen towers are not in the checkpoint: they keep what the builder loaded from their sources
    (`load_module_without_frozen_` checks that nothing else is missing). Same world size: the tag is
    loaded as saved, exactly; `frozen_sources` (this run's) that differ from the recorded ones are
    reported. Another world size (elastic): the engine
    must have been built with `{"checkpoint": {"load_universal": true}}` and the tag converted by
    `convert_to_universal`; trainable weights and optimizer state come from the universal folder,
    frozen towers keep the weights the builder loaded from their source (the universal format does not
    carry them), the data position and step come from rank 0's record, and RNG streams of ranks that
    did not exist before start from the run seed.
    """
    meta = read_meta(ckpt_dir / tag)
    recorded = meta.get("frozen_sources")
    if frozen_sources is not None and recorded is not None and recorded != frozen_sources and _rank() == 0:
        # Moved files are fine; different weights are not, and only the user can tell which it is.
        print(f"warning: {ckpt_dir / tag} was trained against frozen towers from {recorded}; this run loads "
              f"them from {frozen_sources}", flush=True)
    elastic = meta["world_size"] != _world()
    load_tag = universal_tag(tag) if elastic else tag
    if elastic and not (ckpt_dir / load_tag).is_dir():
        raise RuntimeError(f"{ckpt_dir / tag}: saved with {meta['world_size']} ranks, resuming on {_world()}, "
                           "but no universal conversion exists (convert_to_universal)")
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer,
                                          custom_load_fn=load_module_without_frozen_)
    if path is None:
        raise RuntimeError(f"{ckpt_dir / load_tag}: DeepSpeed could not load this checkpoint")
    if has_momentum(engine.module):
        load_momentum_state_(engine.module, ckpt_dir / tag)
    own = ckpt_dir / tag / f"rank_{_rank():05d}.pt"
    rank_state = torch.load(own if own.is_file() else ckpt_dir / tag / "rank_00000.pt", weights_only=False)
    if own.is_file():
        restore_rng_state(rank_state["rng"])
    state = TrainState(**rank_state["train_state"])
    return state, rank_state["data"]
