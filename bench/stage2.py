"""Stage 2 side by side: our Blip2LLM vs transformers' Blip2ForConditionalGeneration, same weights.

The work is the whole stage-2 training step on both sides: frozen ViT -> trainable post-LayerNorm ->
Q-Former over the queries -> projection -> frozen OPT-like LLM over [soft prompt; caption] with the
LM loss on the caption, then backward (into the Q-Former, through the frozen LLM). transformers takes
the soft prompt as image placeholder tokens inside input_ids; ours prepends it to the embedded text.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from blip_train.config.schema import LLMConfig
from blip_train.models.hf_names import model_from_hf
from blip_train.models.llm_bridge import Blip2LLM
from bench.common import Preset, freeze_except_
from bench.stage1 import hf_retrieval_config

REFERENCE_TRAINABLE = ("vision_model.post_layernorm.", "query_tokens", "qformer.", "language_projection.")
PAD, BOS, EOS = 1, 2, 2


def _opt_config(preset: Preset):
    from transformers import OPTConfig

    return OPTConfig(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, dropout=0.0, attention_dropout=0.0,
                     **preset.llm)


def build_stage2_pair(preset: Preset, device: torch.device) -> tuple[Blip2LLM, nn.Module]:
    """(ours, reference) with identical weights on `device`; the LLM in bf16 on CUDA, else fp32.

    The image placeholder id is the last vocabulary entry (captions are drawn below it).
    """
    from transformers import AutoModelForCausalLM, Blip2Config, Blip2ForConditionalGeneration

    base = hf_retrieval_config(preset)
    qformer = base.qformer_config
    qformer.use_qformer_text_input = False  # stage 2 feeds no text to the Q-Former
    text = _opt_config(preset)
    config = Blip2Config(vision_config=base.vision_config.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=base.num_query_tokens,
                         image_token_index=text.vocab_size - 1)
    cfg = replace(preset.model, arch="stage2", llm=LLMConfig(dtype="bf16" if device.type == "cuda" else "fp32"))
    torch.manual_seed(0)
    with device:  # initialise on the device (fast for GPU-sized towers)
        ref = Blip2ForConditionalGeneration(config)
        ours = Blip2LLM(cfg, AutoModelForCausalLM.from_config(text), device_type=device.type)
    result = ours.load_state_dict(model_from_hf(ref.state_dict(), "blip2_generation"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    freeze_except_(ref, REFERENCE_TRAINABLE)
    ours.train()
    ref.train()
    if device.type == "cuda":  # frozen parts in 16-bit on both sides, as ours builds them
        ours.llm.to(torch.bfloat16)
        ref.language_model.to(torch.bfloat16)
        ref.vision_model.embeddings.to(torch.bfloat16)
        ref.vision_model.encoder.to(torch.bfloat16)
    return ours, ref


def make_stage2_batch(preset: Preset, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DecoderLMCollator-like batch: bos + caption, right padding, loss on the caption only."""
    g = torch.Generator().manual_seed(seed)
    b, t = preset.batch_size, preset.text_len
    size = preset.model.vision.image_size
    ids = torch.randint(3, preset.llm["vocab_size"] - 1, (b, t), generator=g)
    ids[:, 0] = BOS
    mask = torch.ones(b, t, dtype=torch.long)
    mask[: b // 4, t // 2:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    batch = {"pixel_values": torch.randn(b, 3, size, size, generator=g), "llm_input_ids": ids,
             "llm_attention_mask": mask, "llm_labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def ours_stage2(model: Blip2LLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch)["loss"]


def reference_stage2(ref: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same step through Blip2ForConditionalGeneration: Nq image placeholders before the caption."""
    ids, mask, labels = batch["llm_input_ids"], batch["llm_attention_mask"], batch["llm_labels"]
    b, nq = ids.shape[0], ref.config.num_query_tokens
    placeholders = torch.full((b, nq), ref.config.image_token_index, dtype=ids.dtype, device=ids.device)
    out = ref(pixel_values=batch["pixel_values"], input_ids=torch.cat([placeholders, ids], dim=1),
              attention_mask=torch.cat([torch.ones_like(placeholders), mask], dim=1),
              labels=torch.cat([torch.full_like(placeholders, -100), labels], dim=1))
    return out.loss
