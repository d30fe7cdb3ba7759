"""Per-architecture builders: config → model (+ tokenizer, collator, data kind). One explicit dict.

A builder constructs the model with the SAME seed on every rank (so an un-partitioned init is identical
everywhere), loads frozen towers from their recorded sources, and says how to build its data loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from blip_train.config import ConfigError, ExperimentConfig
from blip_train.models.freezing import count_parameters
from blip_train.models.world import WorldInfo


@dataclass
class Stage:
    model: nn.Module
    tokenizer: Any
    collate: Callable
    data_kind: str
    cfg: ExperimentConfig
    frozen_sources: dict = field(default_factory=dict)
    _loader: Any = None

    def build_train_loader(self):
        from blip_train.data.datasets import build_train_loader
        self._loader = build_train_loader(self.cfg.data, self.cfg.train.micro_batch_size, self.collate,
                                          kind=self.data_kind)
        return self._loader

    def skipped_samples(self) -> int:
        """Corrupt samples skipped so far on this rank (0 before the loader exists)."""
        return self._loader.dataset.num_corrupt if self._loader is not None else 0


def _require_file(key: str, path: str) -> None:
    from pathlib import Path
    if path and not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist")


def build_stage1_model(cfg: ExperimentConfig, world: WorldInfo | None = None, device_type: str | None = None):
    """Blip2Stage1 with the Q-Former tokenizer; frozen ViT weights loaded from model.vision.weights."""
    from blip_train.data.tokenizers import load_qformer_tokenizer
    from blip_train.models.eva_vit import load_vit_weights
    from blip_train.models.qformer import load_bert_weights
    from blip_train.models.stage1 import Blip2Stage1

    m = cfg.model
    if not m.qformer.tokenizer:
        raise ConfigError("model.qformer.tokenizer: required (a local BERT tokenizer folder)")
    _require_file("model.qformer.tokenizer", m.qformer.tokenizer)
    _require_file("model.vision.weights", m.vision.weights)
    _require_file("model.qformer.bert_init", m.qformer.bert_init)
    tokenizer = load_qformer_tokenizer(m.qformer.tokenizer)
    if len(tokenizer) > m.qformer.vocab_size:
        raise ConfigError(f"model.qformer.vocab_size: {m.qformer.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens ({m.qformer.tokenizer})")
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    model = Blip2Stage1(m, world, device_type=device_type)
    if m.vision.weights:
        load_vit_weights(model.visual_encoder, m.vision.weights)
    if m.qformer.bert_init:
        load_bert_weights(model.qformer, m.qformer.bert_init)
    return model, tokenizer


def build_stage1(cfg: ExperimentConfig, world: WorldInfo, on_cuda: bool) -> Stage:
    from blip_train.data.collate import Stage1Collator

    model, tokenizer = build_stage1_model(cfg, world, "cuda" if on_cuda else "cpu")
    if cfg.model.init_from:
        from blip_train.training.weights import consolidate_trainable, load_trainable_, resolve_checkpoint
        ckpt_dir, tag = resolve_checkpoint(cfg.model.init_from)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        load_trainable_(model, consolidate_trainable(ckpt_dir, tag, names))
    return Stage(model=model, tokenizer=tokenizer, collate=Stage1Collator(tokenizer, cfg.model.max_txt_len),
                 data_kind="caption", cfg=cfg,
                 frozen_sources={"vision": cfg.model.vision.weights or "random-init"})


STAGE_BUILDERS: dict[str, Callable[[ExperimentConfig, WorldInfo, bool], Stage]] = {
    "stage1": build_stage1,
}


def build_stage(cfg: ExperimentConfig, world: WorldInfo, on_cuda: bool) -> Stage:
    if cfg.model.arch not in STAGE_BUILDERS:
        raise ConfigError(f"model.arch: {cfg.model.arch!r} is not built yet (available: {', '.join(STAGE_BUILDERS)})")
    if not cfg.data.train:
        raise ConfigError("data.train: empty; list at least one MDS stream")
    return STAGE_BUILDERS[cfg.model.arch](cfg, world, on_cuda)


def describe_parameters(model: nn.Module) -> str:
    """Trainable and frozen parameter counts per top-level child (what the optimizer will and won't touch)."""
    lines = []
    for name, child in model.named_children():
        tr, fr = count_parameters(child)
        lines.append(f"  {name:<16} trainable {tr:>12,d}  frozen {fr:>12,d}")
    tr, fr = count_parameters(model)
    return "parameters:\n" + "\n".join(lines) + f"\n  {'total':<16} trainable {tr:>12,d}  frozen {fr:>12,d}"
