"""Text generation with a stage-2 / InstructBLIP model, on one rank or many under ZeRO-3.

The model's `generate` reads `query_tokens` outside any module forward, so under ZeRO-3 it is
gathered here (the model never imports deepspeed); with partitioned weights on several ranks every
rank must run every decoding step (`synced_gpus`), even after its own sequences have finished.
All ranks call these functions together.

Generation runs outside `engine(batch)`, so DeepSpeed's discovery of weights that a module reads
from a child without calling it (tied or shared weights in some HF models) is switched on here exactly
as `engine.forward` switches it on; without it a generate-only run (no training step before) could
read an empty ZeRO-3 partition.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from blip_train.distributed.zero import gathered, is_zero3_param

GENERATE_KEYS = ("pixel_values", "llm_input_ids", "llm_attention_mask", "qformer_input_ids", "qformer_attention_mask",
                 "prompt_ids", "question_ids", "question_mask")
"""Batch keys (from a collator built with generation=True) that `Blip2LLM.generate` / `BlipPretrain.generate`
take."""


def needs_synced_gpus(model: nn.Module) -> bool:
    """True when weights are ZeRO-3 partitioned over several ranks (every step is a collective)."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return multi and any(is_zero3_param(p) for p in model.parameters())


@contextmanager
def zero3_forward_context(model: nn.Module) -> Iterator[None]:
    """Mark every module as in forward, as DeepSpeed's engine.forward does under ZeRO-3 (no-op otherwise).

    DeepSpeed's parameter dicts (`ZeROOrderedDict`, recognised by their `_in_forward` flag) then
    gather a partitioned weight on access and register it with the module being run.
    """
    flagged = [m._parameters for m in model.modules() if hasattr(m._parameters, "_in_forward")]
    for params in flagged:
        params._in_forward = True
    try:
        yield
    finally:
        for params in flagged:
            params._in_forward = False


@torch.no_grad()
def generate_ids(model: nn.Module, batch: Mapping[str, Any], **generate_kwargs: Any) -> torch.Tensor:
    """`model.generate` on the batch's tensors (moved to the model's device), the parameters it reads outside a
    module's forward (`eval_root_parameters`: the query tokens) gathered."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in GENERATE_KEYS if k in batch}
    generate_kwargs.setdefault("synced_gpus", needs_synced_gpus(model))
    with gathered(model.eval_root_parameters()), zero3_forward_context(model):
        return model.generate(**inputs, **generate_kwargs)


def generate_text(model: nn.Module, tokenizer: Any, batch: Mapping[str, Any], **generate_kwargs: Any) -> list[str]:
    """Decoded, stripped outputs of `generate_ids` (special tokens dropped)."""
    ids = generate_ids(model, batch, **generate_kwargs)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
