"""A ZeRO-2/3 checkpoint of ours -> one state dict in our names, on CPU, with no process group.

DeepSpeed's own `zero_to_fp32` does the merging: trainable parameters from the fp32 optimizer
partitions of every rank (the master weights; the bf16/fp16 module copies are their rounding),
frozen parameters from the per-rank fragments in the model-state files (saved in their training
dtype). Its internals are called directly (deepspeed is pinned) so that the model-state files are
read once and the parameter lists come with them: which names were trainable, which frozen, which
were buffers, and which were tied aliases of another parameter.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from blip_train.interop.weights_io import InteropError, group_prefixes
from blip_train.training.checkpoint import _TAG, is_complete, list_complete, read_meta, step_of


@dataclass
class Consolidated:
    """Merged tensors (ZeRO-3 trainable ones lazy: materialise with .contiguous()) and what they are."""
    tensors: dict[str, Any]
    trainable: list[str]
    frozen: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    """alias -> the parameter it shares storage with (aliases are not stored)."""
    meta: dict = field(default_factory=dict)
    config: Optional[dict] = None
    """The run's resolved config (config.yaml next to checkpoints/), when present."""


def locate_checkpoint(path: Union[str, Path], tag: Optional[str] = None) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir, its checkpoints/ dir or a tag dir; `tag` picks one explicitly."""
    p = Path(path)
    if not p.exists():
        raise InteropError(f"{p}: no such file or folder")
    if tag is None:
        if is_complete(p):
            return p.parent, p.name
        if p.is_dir() and _TAG.match(p.name):
            raise InteropError(f"{p}: incomplete checkpoint (no complete.json: the save was interrupted)")
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        from blip_train.training.checkpoint import find_resume_tag
        found = find_resume_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        if found is None:
            raise InteropError(f"{p}: not a checkpoint (expected a run dir, its checkpoints/ dir or a step_* dir "
                               "with complete.json)")
        return ckpt_dir, found
    if not _TAG.match(tag):
        raise InteropError(f"--tag {tag!r}: not a checkpoint tag (expected step_NNNNNNN)")
    if is_complete(p) or _TAG.match(p.name):
        p = p.parent  # a tag dir was given together with --tag: look beside it
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not (ckpt_dir / tag).is_dir():
        have = ", ".join(list_complete(ckpt_dir)[-5:]) or "none"
        raise InteropError(f"{ckpt_dir}: no checkpoint tag {tag} (complete tags: {have})")
    if not is_complete(ckpt_dir / tag):
        raise InteropError(f"{ckpt_dir / tag}: incomplete checkpoint (no complete.json: the save was interrupted)")
    return ckpt_dir, tag


def run_config(ckpt_dir: Path) -> Optional[dict]:
    """The run's resolved config as a dict (written at the start of training), or None."""
    f = ckpt_dir.parent / "config.yaml"
    return yaml.safe_load(f.read_text()) if f.is_file() else None


def consolidate_checkpoint(path: Union[str, Path], tag: Optional[str] = None,
                           include_frozen: bool = False) -> Consolidated:
    """Merge the ZeRO shards of one checkpoint. Trainable parameters (fp32 master weights) always;
    frozen parameters and buffers when `include_frozen`. Tied aliases are dropped (see `tied`)."""
    from deepspeed.utils import zero_to_fp32 as z

    ckpt_dir, tag = locate_checkpoint(path, tag)
    tag_dir = ckpt_dir / tag
    info = read_meta(tag_dir)
    if not list(tag_dir.glob("*_model_states.pt")):
        raise InteropError(f"{tag_dir}: no DeepSpeed model-state files (*_model_states.pt)")
    # zero_to_fp32 reports progress with print(); keep the tool's output to its own lines.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
            stage, world, flat_groups, paddings = z.parse_optim_states(z.get_optim_files(str(tag_dir)), str(tag_dir))
            if stage <= 2:
                merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, states, not include_frozen,
                                                                      paddings)
            else:
                merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, states, not include_frozen)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise InteropError(f"{tag_dir}: cannot merge the ZeRO shards ({str(e).splitlines()[0][:200]})") from None
    s0 = states[0]
    trainable = [n for group in s0.param_shapes for n in group]
    frozen = list(s0.frozen_param_shapes or {})
    buffers = list(s0.buffers)
    tied = {alias: src for alias, src in s0.shared_params}
    keep = trainable + (frozen + buffers if include_frozen else [])
    tensors = {n: merged[n] for n in keep if n in merged and n not in tied}
    lost = [n for n in trainable if n not in tensors and n not in tied]
    if lost:
        raise InteropError(f"{tag_dir}: the ZeRO shards lack trainable parameters {lost[:3]}")
    cfg = run_config(ckpt_dir)
    meta = {"arch": (cfg or {}).get("model", {}).get("arch"),
            "contents": "trainable+frozen" if include_frozen else "trainable",
            "names": "blip_train", "tied": tied, "frozen_modules": group_prefixes(frozen),
            "source": {"checkpoint": str(tag_dir.resolve()), "tag": tag, "step": step_of(tag),
                       "world_size": int(info.get("world_size", world)), "zero_stage": int(stage)},
            "config": cfg}
    return Consolidated(tensors=tensors, trainable=[n for n in trainable if n not in tied],
                        frozen=[n for n in frozen if n not in tied], buffers=buffers, tied=tied, meta=meta,
                        config=cfg)


def describe(c: Consolidated) -> str:
    """One line for the tools: what was merged from where."""
    src = c.meta["source"]
    parts = f"{len(c.trainable)} trainable"
    if c.meta["contents"] != "trainable":
        modules = ", ".join(c.meta["frozen_modules"]) or "none"
        parts += f" + {len(c.frozen)} frozen ({modules}) + {len(c.buffers)} buffers"
    return (f"{src['checkpoint']}: ZeRO-{src['zero_stage']}, {src['world_size']} ranks, step {src['step']}: "
            f"{parts} tensors" + (f"; tied aliases dropped: {json.dumps(c.tied)}" if c.tied else ""))
