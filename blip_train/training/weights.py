"""Trained weights out of a run: consolidate the ZeRO shards of the trainable part, load them strictly.

Frozen towers are never taken from a checkpoint: they are rebuilt from their recorded source (the
config's vision weights / LLM folder), exactly as at the start of training. DeepSpeed's universal
checkpoints skip frozen parameters too, so this is also the rule that keeps elastic resume honest.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from blip_train.training.checkpoint import find_resume_tag, read_meta


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """Accept a run dir, its checkpoints/ dir, or one tag dir; return (checkpoints dir, tag)."""
    p = Path(path)
    if (p / "complete.json").is_file():
        return p.parent, p.name
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    tag = find_resume_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint found (expected checkpoints/step_*/complete.json)")
    return ckpt_dir, tag


def consolidate_trainable(ckpt_dir: Path, tag: str, trainable_names: set[str]) -> dict[str, torch.Tensor]:
    """fp32 state dict of the trainable parameters, gathered from every rank's ZeRO shards (no process group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    read_meta(ckpt_dir / tag)  # refuses an incomplete checkpoint
    full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    missing = sorted(trainable_names - set(full))
    if missing:
        raise KeyError(f"{ckpt_dir / tag}: checkpoint lacks trainable parameters {missing[:5]} (wrong model or arch?)")
    return {k: full[k] for k in sorted(trainable_names)}


def load_trainable_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy trainable weights in place; every trainable parameter must be present, nothing else may be."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    unexpected = sorted(set(state) - trainable)
    missing = sorted(trainable - set(state))
    if unexpected or missing:
        raise KeyError(f"trainable weights mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
