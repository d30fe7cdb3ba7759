"""The Q-Former: a BERT-base style encoder over [learned queries; text] (BLIP-2, section 3.1).

- Embeddings: queries enter as given; text gets word + absolute position embeddings (positions start
  at 0 for the first text token, with or without cached queries); one LayerNorm + dropout over the
  concatenation (queries get the LayerNorm too).
- Layers (BERT post-norm): self-attention over all positions with a mask from `masks.py`; in layers
  0, f, 2f, ... (f = cross_attention_freq) cross-attention from the query positions only to the image
  features; a feed-forward network for the query positions (`ffn_query`) and a separate one for the
  text positions (`ffn`).
- ITG: a queries-only call with `use_cache=True` returns each layer's self-attention (key, value)
  of the queries; a text-only call with that cache and mask="causal" lets text see every query and
  earlier text, without cross-attention (BLIP-2's image-grounded text generation).
- `lm_head`: BERT's prediction head; its decoder weight is the word-embedding matrix.

The embedding, attention, FFN and LM-head blocks also build BLIP's MED and ALBEF's text transformer
(`med.py`): they read only the BERT shape fields that `QFormerConfig` and `TextConfig` share.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip_train.config.schema import QFormerConfig, TextConfig
from blip_train.models.attention import attend, check_backend
from blip_train.models.masks import QFORMER_MASKS, padding_mask, qformer_self_attention_mask

if TYPE_CHECKING:
    from blip_train.models.med import MED

BertShape = Union[QFormerConfig, TextConfig]
"""Configs with BERT's shape fields: hidden_size, heads, intermediate_size, vocab_size,
max_position_embeddings, layer_norm_eps, dropout."""

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""Per layer (key, value) of the cached query positions, each (B, H, Nq, Dh)."""


class QFormerOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 walks tuples, lists and dicts of a module's outputs to attach
    its backward hooks (parameter fetch and release) to every tensor; an unknown type hides them."""

    last_hidden_state: torch.Tensor
    """(B, Nq + T, D): query positions first, then text positions (of this call)."""
    past_key_values: Optional[KVCache] = None
    """Set when `use_cache=True`: the queries' self-attention keys/values, per layer."""


class QFormerEmbeddings(nn.Module):
    """`config_key` names the config section in errors (model.qformer, model.text)."""

    def __init__(self, cfg: BertShape, config_key: str = "model.qformer"):
        super().__init__()
        self.config_key = config_key
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, query_embeds: Optional[torch.Tensor], input_ids: Optional[torch.Tensor]) -> torch.Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds.to(self.norm.weight.dtype))  # (B, Nq, D)
        if input_ids is not None:
            if input_ids.size(1) > self.position_embeddings.num_embeddings:
                raise ValueError(f"{input_ids.size(1)} text tokens exceed "
                                 f"{self.config_key}.max_position_embeddings={self.position_embeddings.num_embeddings}")
            pos = torch.arange(input_ids.size(1), device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos))  # (B, T, D)
        return self.dropout(self.norm(torch.cat(parts, dim=1)))  # (B, Nq + T, D)


class QFormerAttention(nn.Module):
    """BERT attention block: multi-head attention, then norm(x + dropout(out(context)))."""

    def __init__(self, cfg: BertShape, kv_width: int, attention: str):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.heads
        self.attention = attention
        self.attn_dropout = cfg.dropout
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_width, d)
        self.value = nn.Linear(kv_width, d)
        self.out = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, Dh)

    def forward(self, x: torch.Tensor, kv_input: torch.Tensor, mask: Optional[torch.Tensor],
                past: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (B, Tq, D) attends to kv_input (B, Tk, kv_width), after `past` keys/values if given.

        Returns the block output (B, Tq, D) and the (key, value) it attended to, (B, H, Tp + Tk, Dh).
        """
        q = self._heads(self.query(x))
        k, v = self._heads(self.key(kv_input)), self._heads(self.value(kv_input))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        ctx = attend(q, k, v, mask, backend=self.attention, dropout_p=self.attn_dropout,
                     training=self.training)  # (B, H, Tq, Dh)
        ctx = ctx.transpose(1, 2).flatten(2)  # (B, Tq, D)
        return self.norm(x + self.dropout(self.out(ctx))), (k, v)


class QFormerFFN(nn.Module):
    """BERT feed-forward block: norm(x + dropout(fc2(gelu(fc1(x)))))."""

    def __init__(self, cfg: BertShape):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_width: int, has_cross_attention: bool, attention: str):
        super().__init__()
        self.self_attn = QFormerAttention(cfg, cfg.hidden_size, attention)
        self.cross_attn = QFormerAttention(cfg, encoder_width, attention) if has_cross_attention else None
        self.ffn = QFormerFFN(cfg)
        self.ffn_query = QFormerFFN(cfg)

    def forward(self, x: torch.Tensor, num_queries: int, self_mask: Optional[torch.Tensor],
                past: Optional[tuple[torch.Tensor, torch.Tensor]], image_embeds: Optional[torch.Tensor],
                image_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (B, Nq + T, D) with `num_queries` query positions first. Returns (B, Nq + T, D), (k, v)."""
        h, kv = self.self_attn(x, x, self_mask, past)
        outputs = []
        if num_queries > 0:
            hq = h[:, :num_queries]  # (B, Nq, D)
            if self.cross_attn is not None:
                if image_embeds is None:
                    raise ValueError("query positions pass through cross-attention: image_embeds is required")
                hq, _ = self.cross_attn(hq, image_embeds, image_mask)
            outputs.append(self.ffn_query(hq))
        if h.size(1) > num_queries:
            outputs.append(self.ffn(h[:, num_queries:]))  # (B, T, D)
        return torch.cat(outputs, dim=1), kv


class QFormerLMHead(nn.Module):
    """BERT prediction head: decoder(norm(gelu(dense(h)))); decoder.weight is tied by the owner."""

    def __init__(self, cfg: BertShape):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))  # (B, T, V)


def init_bert_weights(m: nn.Module) -> None:
    """BERT's init, for `module.apply`: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class QFormer(nn.Module):
    """BERT-style Q-Former with cross-attention to `encoder_width` image features every
    `cfg.cross_attention_freq` layers. The learned query tokens live with the owning model."""

    BERT_INIT_COPIES = ((".ffn.", ".ffn_query."),)
    """(from, to) name parts: `load_bert_weights` starts the query FFN as a copy of the text FFN."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, attention: str = "auto"):
        super().__init__()
        if cfg.hidden_size % cfg.heads:
            raise ValueError(f"model.qformer.hidden_size={cfg.hidden_size} is not divisible by "
                             f"model.qformer.heads={cfg.heads}")
        if cfg.cross_attention_freq < 1:
            raise ValueError(f"model.qformer.cross_attention_freq={cfg.cross_attention_freq} must be >= 1")
        check_backend(attention)
        self.cfg = cfg
        self.grad_checkpointing = cfg.grad_checkpointing
        self.embeddings = QFormerEmbeddings(cfg)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, encoder_width, i % cfg.cross_attention_freq == 0, attention)
            for i in range(cfg.layers))
        self.lm_head = QFormerLMHead(cfg)
        self.apply(init_bert_weights)
        self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as BERT

    def forward(self, *, query_embeds: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None, mask: str = "bidirectional",
                past_key_values: Optional[KVCache] = None, use_cache: bool = False) -> QFormerOutput:
        """Encode [queries; text].

        query_embeds: (B, Nq, D) learned queries (cross-attend to the image), or None.
        input_ids: (B, T) text tokens, or None; attention_mask: (B, T), 1 = real token (default all 1).
        image_embeds: (B, Nimg, encoder_width), needed when queries are given; image_mask: (B, Nimg).
        mask: unimodal | bidirectional | causal self-attention between queries and text.
        past_key_values: cache of query keys/values from a queries-only call (text-only call then).
        use_cache: return the query keys/values of this queries-only call.
        """
        if mask not in QFORMER_MASKS:
            raise ValueError(f"mask={mask!r} is not one of {', '.join(QFORMER_MASKS)}")
        if query_embeds is None and input_ids is None:
            raise ValueError("give query_embeds, input_ids, or both")
        if use_cache and (input_ids is not None or past_key_values is not None):
            raise ValueError("use_cache caches the query positions: call with query_embeds only")
        if past_key_values is not None and query_embeds is not None:
            raise ValueError("with past_key_values the queries are cached: call with input_ids only")
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the Q-Former {len(self.layers)}")

        num_queries = 0 if query_embeds is None else query_embeds.size(1)
        num_cached = 0 if past_key_values is None else past_key_values[0][0].size(2)
        x = self.embeddings(query_embeds, input_ids)  # (B, Nq + T, D)
        self_mask = None  # queries alone see each other freely
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            self_mask = qformer_self_attention_mask(mask, num_queries + num_cached, attention_mask,
                                                    num_cached=num_cached)  # (B, 1, Nq + T, Nc + Nq + T)
        cross_mask = None if image_mask is None else padding_mask(image_mask)  # (B, 1, 1, Nimg)
        if image_embeds is not None:
            image_embeds = image_embeds.to(x.dtype)  # fp32 ln_vision output -> Q-Former dtype

        cache = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            args = (x, num_queries, self_mask, past, image_embeds, cross_mask)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, kv = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, kv = layer(*args)
            cache.append(kv)
        return QFormerOutput(x, tuple(cache) if use_cache else None)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) text hidden states -> (B, T, vocab) next-token logits."""
        return self.lm_head(hidden)


def load_bert_weights(model: Union[QFormer, MED], folder: Union[str, Path]) -> list[str]:
    """Initialise a Q-Former or a MED from a local HF BERT folder (BertModel or BertForMaskedLM weights).

    Copies embeddings, self-attention, text FFN and (when present) the MLM head; cross-attention keeps its
    random init. Parts BERT has no counterpart for start as copies (`model.BERT_INIT_COPIES`): the Q-Former's
    query FFN of the text FFN, MED's decoder self-attention of the encoder's (LAVIS initialises BLIP's
    encoder and decoder both from bert-base). When the folder's vocabulary is smaller (BERT without the
    added [DEC] / [ENC]), its rows fill the first entries and the rest keep their init. BERT's token-type
    embeddings have no counterpart (one segment). Uses the first `cfg.layers` BERT layers. Returns our
    keys left at their initial values.
    """
    from blip_train.models.hf_names import qformer_from_bert, read_hf_folder_weights

    section = model.embeddings.config_key
    sd = qformer_from_bert(read_hf_folder_weights(folder))
    ours = model.state_dict()
    for key in list(sd):
        for part, copy in model.BERT_INIT_COPIES:
            if part in key and key.replace(part, copy) in ours:
                sd.setdefault(key.replace(part, copy), sd[key])
    n_bert_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    if n_bert_layers < len(model.layers):
        raise ValueError(f"{folder} has {n_bert_layers} layers, {section}.layers={len(model.layers)}")
    sd = {k: v for k, v in sd.items() if not k.startswith("layers.") or int(k.split(".")[1]) < len(model.layers)}
    unexpected = sorted(set(sd) - set(ours))
    if unexpected:
        raise ValueError(f"{folder}: BERT weights with no place in the {type(model).__name__}: {unexpected}")
    for name in ("embeddings.word_embeddings.weight", "lm_head.decoder.bias"):
        if name in sd:
            if sd[name].size(0) > ours[name].size(0):
                raise ValueError(f"{folder} has a vocabulary of {sd[name].size(0)}, larger than "
                                 f"{section}.vocab_size={ours[name].size(0)}")
            rows = ours[name].clone()
            rows[: sd[name].size(0)] = sd[name]
            sd[name] = rows
    sd.pop("lm_head.decoder.weight", None)  # tied to the word embeddings, already set
    with torch.no_grad():
        for name, value in sd.items():
            ours[name].copy_(value)
    tied = "lm_head.decoder.weight"
    return sorted(k for k in ours if k not in sd and k != tied)
