"""BLIP's Multimodal mixture of Encoder-Decoder (MED) and ALBEF's text + fusion BERT: one class, `MED`.

A BERT-base post-norm transformer built from the Q-Former's blocks (`qformer.py`):
- Embeddings: word + absolute position embeddings, LayerNorm, dropout (no token types, as BLIP).
- Layer i: `self_attn` (bidirectional, padding-masked); `cross_attn` to the image features when
  i >= cfg.fusion_layer; `ffn`. With cfg.decoder also `self_attn_dec`, the decoder's causal self-attention.
- `lm_head`: BERT's prediction head, its decoder weight tied to the word embeddings (BLIP's LM, ALBEF's MLM).

Three modes over the same weights:
- text: the unimodal text encoder ([CLS] first): the layers below fusion_layer (all when it is 0), without
  cross-attention.
- multimodal: the image-grounded encoder: every layer, cross-attending where the layer can ([ENC] first in
  BLIP). ALBEF's fusion encoder reuses the text output: with `text_hidden` only layers >= fusion_layer run.
- decoder: BLIP's image-grounded decoder ([DEC] first): `self_attn_dec` under a causal + padding mask, then
  the same cross-attention and FFN. So the decoder shares every parameter with the encoder except its
  self-attention (BLIP, section 3.1; LAVIS ties its text encoder and decoder the same way).

`qformer.load_bert_weights` initialises a MED from a local BERT folder (the decoder self-attention starts as
a copy of the encoder's); `hf_names_blip.med_*` map the names to transformers' BlipTextModel /
BlipTextLMHeadModel and from the authors' BLIP checkpoints.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip_train.config.schema import TextConfig
from blip_train.models.attention import check_backend
from blip_train.models.masks import causal_mask, padding_mask
from blip_train.models.qformer import QFormerAttention, QFormerEmbeddings, QFormerFFN, QFormerLMHead, init_bert_weights

MED_MODES = ("text", "multimodal", "decoder")


class MEDLayer(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int, has_cross_attention: bool, attention: str):
        super().__init__()
        self.self_attn = QFormerAttention(cfg, cfg.hidden_size, attention)
        self.self_attn_dec = QFormerAttention(cfg, cfg.hidden_size, attention) if cfg.decoder else None
        self.cross_attn = QFormerAttention(cfg, encoder_width, attention) if has_cross_attention else None
        self.ffn = QFormerFFN(cfg)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, decoder: bool, image_embeds: Optional[torch.Tensor],
                image_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D). Cross-attends when the layer has cross-attention and an image is given."""
        attn = self.self_attn_dec if decoder else self.self_attn
        h, _ = attn(x, x, self_mask)  # (B, T, D)
        if self.cross_attn is not None and image_embeds is not None:
            h, _ = self.cross_attn(h, image_embeds, image_mask)  # (B, T, D)
        return self.ffn(h)


class MED(nn.Module):
    """BERT-style text transformer with cross-attention to `encoder_width` image features in the layers
    >= `cfg.fusion_layer`, and (cfg.decoder) a causal self-attention per layer for the decoder."""

    BERT_INIT_COPIES = ((".self_attn.", ".self_attn_dec."),)
    """(from, to) name parts: `load_bert_weights` starts the decoder self-attention as a copy of the encoder's."""

    def __init__(self, cfg: TextConfig, encoder_width: int, attention: str = "auto", text_only: bool = False):
        """text_only: build the unimodal text encoder alone (no cross-attention, no decoder; mode "text" only), as
        BLIP's momentum text encoder, which never sees the image."""
        super().__init__()
        if cfg.hidden_size % cfg.heads:
            raise ValueError(f"model.text.hidden_size={cfg.hidden_size} is not divisible by "
                             f"model.text.heads={cfg.heads}")
        if not 0 <= cfg.fusion_layer < cfg.layers:
            raise ValueError(f"model.text.fusion_layer={cfg.fusion_layer} must lie in [0, model.text.layers="
                             f"{cfg.layers}): some layer must cross-attend to the image")
        check_backend(attention)
        self.cfg = cfg
        self.fusion_layer = cfg.fusion_layer
        self.text_only = text_only
        self.grad_checkpointing = cfg.grad_checkpointing
        self.embeddings = QFormerEmbeddings(cfg, config_key="model.text")
        if text_only:
            cfg = replace(cfg, decoder=False)
        self.layers = nn.ModuleList(MEDLayer(cfg, encoder_width, not text_only and i >= cfg.fusion_layer, attention)
                                    for i in range(cfg.layers))
        self.lm_head = QFormerLMHead(cfg)
        self.apply(init_bert_weights)
        self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as BERT

    def forward(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor] = None,
                image_embeds: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None,
                mode: str = "text", text_hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode or decode text; returns the last hidden states (B, T, D).

        input_ids: (B, T) tokens, or None when `text_hidden` is given; attention_mask: (B, T), 1 = real
        token (default all 1). image_embeds: (B, Nimg, encoder_width), required by the multimodal and
        decoder modes, refused by text mode; image_mask: (B, Nimg), 1 = real image token (default all).
        mode: text | multimodal | decoder (see the module docstring).
        text_hidden: (B, T, D) output of mode="text" (ALBEF, fusion_layer > 0): multimodal mode then runs only
        the fusion layers on it.
        """
        if mode not in MED_MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MED_MODES)}")
        if (input_ids is None) == (text_hidden is None):
            raise ValueError("give input_ids, or text_hidden for the fusion layers, not both")
        if text_hidden is not None and (mode != "multimodal" or self.fusion_layer == 0):
            raise ValueError("text_hidden feeds the fusion layers: it needs mode='multimodal' and "
                             f"model.text.fusion_layer > 0 (this MED: {self.fusion_layer})")
        if mode != "text" and self.text_only:
            raise ValueError(f"mode={mode!r}: this MED is a text-only encoder (built with text_only=True)")
        if mode == "text" and image_embeds is not None:
            raise ValueError("mode='text' is the unimodal text encoder: it takes no image_embeds")
        if mode != "text" and image_embeds is None:
            raise ValueError(f"mode={mode!r} cross-attends to the image: image_embeds is required")
        if mode == "decoder" and self.layers[0].self_attn_dec is None:
            raise ValueError("mode='decoder' needs a MED built with model.text.decoder=true")

        x = self.embeddings(None, input_ids) if text_hidden is None else text_hidden  # (B, T, D)
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        self_mask = padding_mask(attention_mask)  # (B, 1, 1, T)
        if mode == "decoder":
            self_mask = self_mask & causal_mask(x.size(1), x.device)  # (B, 1, T, T)
        cross_mask = None if image_mask is None else padding_mask(image_mask)  # (B, 1, 1, Nimg)
        if image_embeds is not None:
            image_embeds = image_embeds.to(x.dtype)

        first = 0 if text_hidden is None else self.fusion_layer
        last = self.fusion_layer if mode == "text" and self.fusion_layer > 0 else len(self.layers)
        for layer in self.layers[first:last]:
            args = (x, self_mask, mode == "decoder", image_embeds, cross_mask)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) hidden states -> (B, T, vocab) logits (next token for the decoder, masked token for MLM)."""
        return self.lm_head(hidden)
