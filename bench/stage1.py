"""Stage 1 side by side: our Blip2Stage1 vs transformers' Blip2ForImageTextRetrieval, same weights.

transformers has no stage-1 training losses and no ITG, so the compared work is what both can do,
done the same way on both sides with the same loss functions (`models/stage1_losses.py`):
  frozen ViT (forward only) -> trainable post-LayerNorm
  ITC: Q-Former over the queries (cross-attending to the image), Q-Former over the text alone,
       projections, contrastive loss
  ITM: one hard negative per sample and direction (same draws: the RNG is reset before each step),
       Q-Former over [queries; text] with the bidirectional mask for 3B pairs, ITM head, CE
followed by backward. Our full step (ITC + ITM + ITG) is timed separately, for information.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip_train.models.hf_names import model_from_hf
from blip_train.models.stage1 import Blip2Stage1, pad_text_for_gather
from blip_train.models.stage1_losses import itc_loss, itm_loss, sample_hard_negatives
from blip_train.models.world import WorldInfo
from bench.common import Preset, freeze_except_

REFERENCE_TRAINABLE = ("vision_model.post_layernorm.", "query_tokens", "embeddings.", "qformer.",
                       "vision_projection.", "text_projection.", "itm_head.")
"""Blip2ForImageTextRetrieval parameters that train in stage 1 (ours: all but the ViT)."""


def hf_retrieval_config(preset: Preset):
    """Blip2Config describing exactly our preset (exact GELU, EVA qkv biases, same eps and sizes)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    v, q = preset.model.vision, preset.model.qformer
    vision = Blip2VisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim,
                               num_hidden_layers=v.layers - 1 if v.drop_last_block else v.layers,
                               num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                               hidden_act="gelu", layer_norm_eps=v.layer_norm_eps, attention_dropout=0.0,
                               qkv_bias=True)
    qformer = Blip2QFormerConfig(vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.layers,
                                 num_attention_heads=q.heads, intermediate_size=q.intermediate_size,
                                 hidden_act="gelu", hidden_dropout_prob=q.dropout,
                                 attention_probs_dropout_prob=q.dropout,
                                 max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
                                 cross_attention_frequency=q.cross_attention_freq, encoder_hidden_size=v.width,
                                 use_qformer_text_input=True)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                       num_query_tokens=q.num_query_tokens, image_text_hidden_size=preset.model.embed_dim)


def build_stage1_pair(preset: Preset, device: torch.device) -> tuple[Blip2Stage1, nn.Module, nn.Parameter]:
    """(ours, reference, reference temperature) with identical weights on `device`.

    The reference gets transformers' fastest attention for each part (SDPA in the ViT; its Q-Former
    only has the eager implementation). On CUDA both frozen ViTs hold bf16 weights; elsewhere fp32.
    """
    from transformers import Blip2ForImageTextRetrieval

    torch.manual_seed(0)
    with device:  # initialise on the device: a ViT-g initialised on the host takes minutes
        ref = Blip2ForImageTextRetrieval(hf_retrieval_config(preset))  # picks SDPA wherever it supports it
        ours = Blip2Stage1(preset.model, device_type=device.type)
    missing = ours.load_state_dict(model_from_hf(ref.state_dict(), "blip2_retrieval"), strict=False).missing_keys
    # Our extras: the ITC temperature (same init as the reference's below) and the ITG head.
    assert all(k == "temp" or k.startswith("qformer.lm_head.") for k in missing), missing
    freeze_except_(ref, REFERENCE_TRAINABLE)
    ref_temp = nn.Parameter(torch.full((1,), 0.07, device=device))
    ours.train()
    ref.train()
    if device.type == "cuda":  # frozen tower in 16-bit on both sides (ours: precision bf16)
        ref.vision_model.embeddings.to(torch.bfloat16)
        ref.vision_model.encoder.to(torch.bfloat16)
    return ours, ref, ref_temp


def make_stage1_batch(preset: Preset, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A stage-1 micro-batch as Stage1Collator makes it; a quarter of the captions are padded short."""
    g = torch.Generator().manual_seed(seed)
    b, t, q = preset.batch_size, preset.text_len, preset.model.qformer
    size = preset.model.vision.image_size
    ids = torch.randint(5, q.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[: b // 4, t // 2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    itg_ids = ids.clone()
    itg_ids[:, 0] = q.vocab_size - 1  # [DEC]
    batch = {"pixel_values": torch.randn(b, 3, size, size, generator=g), "text_ids": ids, "text_mask": mask,
             "itg_input_ids": itg_ids, "itg_labels": itg_ids.masked_fill(mask == 0, -100),
             "image_ids": torch.arange(b)}
    return {k: v.to(device) for k, v in batch.items()}


def ours_itc_itm(model: Blip2Stage1, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """ITC + ITM through our building blocks, as in `Blip2Stage1.forward` without ITG."""
    ids, mask, image_ids = batch["text_ids"], batch["text_mask"], batch["image_ids"]
    b = ids.shape[0]
    image_embeds = model.image_embeddings(batch["pixel_values"])  # (B, Nimg, W)
    query_out = model.qformer(query_embeds=model._queries(b), image_embeds=image_embeds)
    image_feats = F.normalize(model.vision_proj(query_out.last_hidden_state), dim=-1)  # (B, Nq, E)
    text_out = model.qformer(input_ids=ids, attention_mask=mask)
    text_feat = F.normalize(model.text_proj(text_out.last_hidden_state[:, 0]), dim=-1)  # (B, E)
    itc = itc_loss(image_feats, text_feat, model._temperature(), model.world, image_ids=image_ids)
    neg_img, neg_txt = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, model.world, image_ids=image_ids)
    ids_pad, mask_pad = pad_text_for_gather(ids, mask, model.max_txt_len)  # (B, L)
    itm_ids = torch.cat([ids_pad, ids_pad, ids_pad[neg_txt]])  # (3B, L)
    itm_mask = torch.cat([mask_pad, mask_pad, mask_pad[neg_txt]])
    itm_images = torch.cat([image_embeds, image_embeds[neg_img], image_embeds])  # (3B, Nimg, W)
    return itc.loss + itm_loss(model._itm_logits(itm_images, itm_ids, itm_mask))


def reference_itc_itm(ref: nn.Module, temp: nn.Parameter, batch: dict[str, torch.Tensor],
                      max_txt_len: int) -> torch.Tensor:
    """The same ITC + ITM through transformers' modules (as Blip2ForImageTextRetrieval.forward uses them)."""
    ids, mask, image_ids = batch["text_ids"], batch["text_mask"], batch["image_ids"]
    b, nq = ids.shape[0], ref.query_tokens.shape[1]
    with torch.no_grad():
        temp.clamp_(0.001, 0.5)
    image_embeds = ref.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state  # post-LN included
    image_embeds = image_embeds.to(ref.query_tokens.dtype)
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=ids.device)
    queries = ref.query_tokens.expand(b, -1, -1)
    q_out = ref.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask).last_hidden_state
    image_feats = F.normalize(ref.vision_projection(q_out), dim=-1)
    t_out = ref.qformer(query_embeds=ref.embeddings(input_ids=ids), query_length=0,
                        attention_mask=mask).last_hidden_state
    text_feat = F.normalize(ref.text_projection(t_out[:, 0]), dim=-1)
    world = WorldInfo()
    itc = itc_loss(image_feats, text_feat, temp, world, image_ids=image_ids)
    neg_img, neg_txt = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, world, image_ids=image_ids)
    pad = max_txt_len - ids.shape[1]
    ids_pad, mask_pad = F.pad(ids, (0, pad)), F.pad(mask, (0, pad))
    itm_ids = torch.cat([ids_pad, ids_pad, ids_pad[neg_txt]])
    itm_mask = torch.cat([mask_pad, mask_pad, mask_pad[neg_txt]])
    itm_images = torch.cat([image_embeds, image_embeds[neg_img], image_embeds])
    n = itm_ids.shape[0]
    embeds = ref.embeddings(input_ids=itm_ids, query_embeds=ref.query_tokens.expand(n, -1, -1))
    joint_mask = torch.cat([torch.ones(n, nq, dtype=itm_mask.dtype, device=ids.device), itm_mask], dim=1)
    out = ref.qformer(query_embeds=embeds, query_length=nq, attention_mask=joint_mask,
                      encoder_hidden_states=itm_images,
                      encoder_attention_mask=torch.ones(itm_images.shape[:2], dtype=torch.long,
                                                        device=ids.device)).last_hidden_state
    logits = ref.itm_head(out[:, :nq]).mean(dim=1)  # (3B, 2)
    return itc.loss + itm_loss(logits)
