"""Text generation with a stage-2 / InstructBLIP model, on one rank or many under ZeRO-3.

The model's `generate` reads `query_tokens` outside any module forward, so under ZeRO-3 it is
gathered here (the model never imports deepspeed); with partitioned weights on several ranks every
rank must run every decoding step (`synced_gpus`), even after its own sequences have finished.
All ranks call these functions together.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from blip_train.dist.zero import gathered, is_zero3_param

GENERATE_KEYS = ("pixel_values", "llm_input_ids", "llm_attention_mask", "qformer_input_ids", "qformer_attention_mask")
"""Batch keys (from a collator built with generation=True) that `Blip2LLM.generate` takes."""


def needs_synced_gpus(model: nn.Module) -> bool:
    """True when weights are ZeRO-3 partitioned over several ranks (every step is a collective)."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return multi and any(is_zero3_param(p) for p in model.parameters())


@torch.no_grad()
def generate_ids(model: nn.Module, batch: Mapping[str, Any], **generate_kwargs: Any) -> torch.Tensor:
    """`model.generate` on the batch's tensors (moved to the model's device), query tokens gathered."""
    device = model.query_tokens.device
    inputs = {k: batch[k].to(device) for k in GENERATE_KEYS if k in batch}
    generate_kwargs.setdefault("synced_gpus", needs_synced_gpus(model))
    with gathered([model.query_tokens]):
        return model.generate(**inputs, **generate_kwargs)


def generate_text(model: nn.Module, tokenizer: Any, batch: Mapping[str, Any], **generate_kwargs: Any) -> list[str]:
    """Decoded, stripped outputs of `generate_ids` (special tokens dropped)."""
    ids = generate_ids(model, batch, **generate_kwargs)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
