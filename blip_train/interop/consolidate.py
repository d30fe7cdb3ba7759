"""A ZeRO-2/3 checkpoint of ours -> one state dict in our names, on CPU, with no process group.

DeepSpeed's own `zero_to_fp32` does the merging: trainable parameters from the fp32 optimizer
partitions of every rank (the master weights; the bf16/fp16 module copies are their rounding), buffers
from the model-state files. Its internals are called directly (deepspeed is pinned) so that the
model-state files are read once and the parameter lists come with them: which names were trainable,
which were buffers, and which were tied aliases of another parameter.

Checkpoints do not carry the frozen towers (see `training/checkpoint.py`): with `include_frozen` they
are read from the sources the run recorded in complete.json (`frozen_sources`: the ViT weights file, the
LLM folder), in the dtype training held them in (`frozen`), exactly as the stage builders load them.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
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
    """(checkpoints dir, tag) from a run dir, its checkpoints/ dir or a tag dir; `tag` picks one explicitly.
    The checkpoint's files are verified (sizes and CRC-32): a damaged one is refused, naming the file."""
    from blip_train.training.checkpoint import CheckpointError, require_whole_checkpoint

    ckpt_dir, tag = find_checkpoint(path, tag)
    try:
        require_whole_checkpoint(ckpt_dir / tag)
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    return ckpt_dir, tag


def find_checkpoint(path: Union[str, Path], tag: Optional[str]) -> tuple[Path, str]:
    """`locate_checkpoint` without reading the files: where a tag is, for a look at its recorded config."""
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


def run_config(ckpt_dir: Path, tag: Optional[str] = None) -> Optional[dict]:
    """The run's resolved config as a dict: the one checkpoint `tag` was saved under (config.yaml for an
    older checkpoint, or without a tag), or None when there is none."""
    from blip_train.config.changes import CONFIG_FILE, config_file_for

    f = config_file_for(ckpt_dir, tag) if tag is not None else ckpt_dir.parent / CONFIG_FILE
    return yaml.safe_load(f.read_text()) if f.is_file() else None


REPO = Path(__file__).resolve().parents[2]


def _source_path(recorded: str, what: str, key: str, tag_dir: Path) -> Path:
    """A recorded source path: as written (absolute, or relative to here), else relative to the checkout
    (a run's paths are relative to where it ran, usually the repository: `make demo`)."""
    if not recorded or recorded == "random-init":
        raise InteropError(f"{tag_dir}: the frozen {what} was randomly initialised ({key} empty): there is no "
                           "source to read it from")
    for candidate in (Path(recorded), REPO / recorded):
        if candidate.exists():
            return candidate
    raise InteropError(f"{tag_dir}: the frozen {what}'s source {recorded} ({key}, recorded in complete.json) "
                       "does not exist here")


def _frozen_vision(cfg: dict, path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from blip_train.config import config_from_dict
    from blip_train.interop.hf_export import frozen_vision_state

    exp = config_from_dict(cfg)
    exp.model.vision = replace(exp.model.vision, weights=str(path))
    # Loaded in fp32 and rounded once, as the builder's copy into the frozen-dtype tower rounds it.
    return {f"visual_encoder.{k}": t.to(dtype) for k, t in frozen_vision_state(exp, {}).items()}


def _frozen_llm(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    llm = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    # named_parameters names a tied weight once, as DeepSpeed does (the alias is in `shared_params`).
    return {f"llm.{k}": t.detach() for k, t in llm.named_parameters()}


def _frozen_audio(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import ASTModel

    ast = ASTModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return {f"audio_encoder.ast.{k}": t.detach() for k, t in ast.named_parameters()}


def _frozen_points(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from blip_train.models.point_encoder import load_point_encoder

    try:
        encoder = load_point_encoder(path, dtype)
    except ValueError as e:
        raise InteropError(str(e)) from None
    return {f"points_encoder.{k}": t.detach() for k, t in encoder.named_parameters()}


def frozen_from_sources(tag_dir: Path, info: dict, cfg: Optional[dict]) -> dict[str, torch.Tensor]:
    """The frozen parameters of the run behind `tag_dir`, in our names, read from their recorded sources
    and cast to the dtype training held them in; checked against the checkpoint's record of them."""
    manifest, sources = info.get("frozen"), info.get("frozen_sources") or {}
    if manifest is None:
        raise InteropError(f"{tag_dir}: complete.json does not record the frozen towers (`frozen`), so they "
                           "cannot be rebuilt from their sources")
    out: dict[str, torch.Tensor] = {}
    for root, record in manifest.items():
        dtype = getattr(torch, record["dtype"])
        if root == "visual_encoder":
            if cfg is None:
                raise InteropError(f"{tag_dir}: the run's config.yaml (next to checkpoints/) is needed to rebuild "
                                   "the frozen ViT")
            part = _frozen_vision(cfg, _source_path(sources.get("vision", ""), "ViT", "model.vision.weights",
                                                    tag_dir), dtype)
        elif root == "audio_encoder":
            part = _frozen_audio(_source_path(sources.get("audio", ""), "audio encoder", "model.audio.encoder",
                                              tag_dir), dtype)
        elif root == "points_encoder":
            part = _frozen_points(_source_path(sources.get("3d", ""), "point-cloud encoder", "model.points.encoder",
                                               tag_dir), dtype)
        elif root == "llm":
            part = _frozen_llm(_source_path(sources.get("llm", ""), "LLM", "model.llm.path", tag_dir), dtype)
        else:
            raise InteropError(f"{tag_dir}: frozen parameters under {root!r} have no recorded source")
        numel = sum(t.numel() for t in part.values())
        if (len(part), numel) != (record["tensors"], record["numel"]):
            raise InteropError(f"{tag_dir}: the source of {root} gives {len(part)} tensors / {numel:,d} elements, "
                               f"the run trained with {record['tensors']} / {record['numel']:,d} (the source changed?)")
        out.update(part)
    return out


def consolidate_checkpoint(path: Union[str, Path], tag: Optional[str] = None,
                           include_frozen: bool = False) -> Consolidated:
    """Merge the ZeRO shards of one checkpoint: the trainable parameters (fp32 master weights); with
    `include_frozen` also the buffers and the frozen towers (from their recorded sources, see
    `frozen_from_sources`). Tied aliases are dropped (see `tied`)."""
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
                merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, states, True, paddings)
            else:
                merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, states, True)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise InteropError(f"{tag_dir}: cannot merge the ZeRO shards ({str(e).splitlines()[0][:200]})") from None
    s0 = states[0]
    cfg = run_config(ckpt_dir, tag)
    trainable = [n for group in s0.param_shapes for n in group]
    buffers = list(s0.buffers)
    tied = {alias: src for alias, src in s0.shared_params}
    frozen_tensors = frozen_from_sources(tag_dir, info, cfg) if include_frozen else {}
    frozen = list(frozen_tensors)
    keep = trainable + (buffers if include_frozen else [])
    tensors = {n: merged[n] for n in keep if n in merged and n not in tied}
    tensors.update({n: t for n, t in frozen_tensors.items() if n not in tied})
    lost = [n for n in trainable if n not in tensors and n not in tied]
    if lost:
        raise InteropError(f"{tag_dir}: the ZeRO shards lack trainable parameters {lost[:3]}")
    meta = {"arch": (cfg or {}).get("model", {}).get("arch"),
            "contents": "trainable+frozen" if include_frozen else "trainable",
            "names": "blip_train", "tied": tied, "frozen_modules": group_prefixes(frozen),
            "source": {"checkpoint": str(tag_dir.resolve()), "tag": tag, "step": step_of(tag),
                       "world_size": int(info.get("world_size", world)), "zero_stage": int(stage)},
            "config": cfg}
    if include_frozen:
        meta["frozen_sources"] = info.get("frozen_sources")
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
