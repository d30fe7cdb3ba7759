"""The single name mapping between our state dicts and transformers' / BERT's / LAVIS's.

Ours (see eva_vit.py, qformer.py, med.py):
  EVAViT   cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1,attn.qkv.weight,attn.q_bias,
           attn.v_bias,attn.proj,norm2,mlp.fc1,mlp.fc2}.*   (identical to EVA / LAVIS checkpoints),
           norm.* with final_norm (BLIP / ALBEF)
  QFormer  embeddings.{word_embeddings,position_embeddings,norm}.*,
           layers.{i}.{self_attn,cross_attn}.{query,key,value,out,norm}.*,
           layers.{i}.{ffn,ffn_query}.{fc1,fc2,norm}.*, lm_head.{dense,norm,decoder}.*
  MED      embeddings.*, layers.{i}.{self_attn,self_attn_dec,cross_attn}.{query,key,value,out,norm}.*,
           layers.{i}.ffn.{fc1,fc2,norm}.*, lm_head.* (as the Q-Former's; see med.py)

transformers:
  Blip2VisionModel: ours + `ln_vision` <-> embeddings.*, encoder.layers.{i}.*, post_layernorm.*.
    HF fuses the biases: self_attn.qkv.bias = cat(q_bias, k_bias, v_bias). EVA's k bias is zero, and
    any k bias is dropped on import without changing outputs (softmax ignores a per-row constant).
  Q-Former layouts (QFORMER_LAYOUTS): where the Q-Former's pieces sit in each HF class.
    blip2_qformer            Blip2QFormerModel (use_qformer_text_input=True, as the ITM checkpoints):
                             our embeddings.norm is its `layernorm`; no word/position embeddings.
    instructblip_qformer     InstructBlipQFormerModel: embeddings.{word,position}_embeddings, .layernorm.
    blip2_retrieval          Blip2ForImageTextRetrieval / Blip2TextModelWithProjection: `qformer.` plus
                             top-level `embeddings.{word,position}_embeddings`.
    blip2_generation         Blip2ForConditionalGeneration / Blip2Model: `qformer.`; no text embeddings
                             and no text FFN (stage 2 never feeds text to the Q-Former).
    instructblip_generation  InstructBlipForConditionalGeneration: `qformer.` + InstructBLIP names.
  Our `lm_head` has no counterpart in any HF class (none keeps the Q-Former's MLM/ITG head).
  BlipVisionModel (BLIP): as Blip2VisionModel, but post_layernorm is the tower's own `norm` (final_norm).
  MED (MED_VIEWS): BlipTextModel (`encoder`: embeddings.*, encoder.layer.{i}.{attention,crossattention}.*)
    and BlipTextLMHeadModel (`decoder`: bert.* with `attention` = our self_attn_dec, cls.predictions.*).
  BLIP whole models (BLIP_LAYOUTS, blip_model_to_hf / blip_model_from_hf): BlipPretrain's visual_encoder /
    text / heads as BlipForImageTextRetrieval, BlipForConditionalGeneration, BlipForQuestionAnswering.
BERT / LAVIS: bert.embeddings.*, bert.encoder.layer.{i}.{attention.self,crossattention.self,...},
  intermediate(_query), output(_query), cls.predictions.* (qformer_from_bert / qformer_to_bert; the
  same names initialise a MED from BERT).
BLIP (authors' checkpoints): visual_encoder.* timm ViT names (blip_vision_from_timm: ours but a full qkv
  bias), text_encoder.* / text_decoder.* as the transformers text classes (med_from_blip); whole
  pretraining checkpoints with momentum copies and queues: blip_model_from_authors.
LAVIS whole models (model_from_lavis): `Qformer.` + BERT names, {opt,t5,llm}_proj -> llm_proj, the rest as ours.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from blip_train.models.eva_vit import read_state_dict

Pairs = list[tuple[str, str]]
"""(ours, theirs) name templates: `{i}` is a layer index; a template ending in '.' is a module prefix."""


def _translate(key: str, pairs: Pairs) -> Optional[str]:
    for src, dst in pairs:
        pattern = re.escape(src).replace(r"\{i\}", r"(\d+)")
        m = re.match(pattern + (r"(.+)" if src.endswith(".") else r"$"), key)
        if m is None:
            continue
        groups = list(m.groups())
        rest = groups.pop() if src.endswith(".") else ""
        out = dst
        for g in groups:
            out = out.replace("{i}", g, 1)
        return out + rest
    return None


def _swap(pairs: Pairs) -> Pairs:
    return [(b, a) for a, b in pairs]


def _starts(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(re.match(re.escape(p).replace(r"\{i\}", r"\d+"), key) for p in prefixes)


# ----------------------------------------------------------------------------------------- vision

_VIT_PAIRS: Pairs = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.attn.qkv.weight", "encoder.layers.{i}.self_attn.qkv.weight"),
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.mlp.", "encoder.layers.{i}.mlp."),
]
_VISION_PAIRS: Pairs = _VIT_PAIRS + [("ln_vision.", "post_layernorm.")]
"""BLIP-2: the tower has no final norm; HF's post_layernorm is our separate `ln_vision`."""
_BLIP_VISION_PAIRS: Pairs = _VIT_PAIRS + [("norm.", "post_layernorm.")]
"""BLIP: HF's post_layernorm is the tower's own final `norm` (VisionConfig.final_norm); timm names it `norm`."""


def fuse_qkv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """EVA/LAVIS/HF convention for the fused qkv bias: cat(q_bias, zeros, v_bias), (3D,)."""
    return torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def split_qkv_bias(qkv_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(3D,) fused bias -> (q_bias, v_bias); the k part is dropped (softmax-invariant)."""
    q, _, v = qkv_bias.chunk(3)
    return q, v


def _vit_to_hf(sd: Mapping[str, torch.Tensor], pairs: Pairs) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.(q_bias|v_bias)", key)
        if m:
            if m.group(2) == "q_bias":
                out[f"encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = fuse_qkv_bias(
                    value, sd[f"blocks.{m.group(1)}.attn.v_bias"])
            continue
        name = _translate(key, pairs)
        if name is None:
            raise ValueError(f"vision key {key!r} has no transformers name")
        out[name] = value
    return out


def _vit_from_hf(sd: Mapping[str, torch.Tensor], pairs: Pairs) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key)
        if m:
            out[f"blocks.{m.group(1)}.attn.q_bias"], out[f"blocks.{m.group(1)}.attn.v_bias"] = split_qkv_bias(value)
            continue
        name = _translate(key, _swap(pairs))
        if name is None:
            raise ValueError(f"transformers vision key {key!r} has no counterpart in EVAViT")
        out[name] = value
    return out


def vision_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EVAViT keys (plus optional `ln_vision.*`) -> Blip2VisionModel keys."""
    return _vit_to_hf(sd, _VISION_PAIRS)


def vision_from_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Blip2VisionModel / InstructBlipVisionModel keys -> EVAViT keys (post_layernorm -> `ln_vision.*`)."""
    return _vit_from_hf(sd, _VISION_PAIRS)


def blip_vision_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EVAViT keys of a tower with `final_norm` -> BlipVisionModel keys (its k bias is written as zeros)."""
    return _vit_to_hf(sd, _BLIP_VISION_PAIRS)


def blip_vision_from_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BlipVisionModel keys (BLIP's `vision_model.*`, prefix stripped) -> EVAViT keys with the final `norm`."""
    return _vit_from_hf(sd, _BLIP_VISION_PAIRS)


def blip_vision_from_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' timm ViT (BLIP / ALBEF checkpoints' `visual_encoder.*`, prefix stripped) -> EVAViT keys.

    timm's names are ours except the full qkv bias, which splits into q_bias and v_bias (its k third is
    dropped: softmax-invariant). Unknown keys (a classifier head) raise.
    """
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.bias", key)
        if m:
            out[f"blocks.{m.group(1)}.attn.q_bias"], out[f"blocks.{m.group(1)}.attn.v_bias"] = split_qkv_bias(value)
        elif _translate(key, _BLIP_VISION_PAIRS) is None:
            raise ValueError(f"timm ViT key {key!r} has no counterpart in EVAViT")
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------- Q-Former

Blocks = tuple[tuple[str, str], ...]
"""(ours, theirs) module names inside one layer: attention blocks (theirs: `attention`, `crossattention`)
or FFNs (theirs: the suffix of `intermediate` / `output`)."""
_ENCODER_ATTENTIONS: Blocks = (("self_attn", "attention"), ("cross_attn", "crossattention"))
_DECODER_ATTENTIONS: Blocks = (("self_attn_dec", "attention"), ("cross_attn", "crossattention"))
"""MED's decoder view: its own causal self-attention is the decoder's `attention`."""
_QFORMER_FFNS: Blocks = (("ffn_query", "_query"), ("ffn", ""))
_TEXT_FFNS: Blocks = (("ffn", ""),)


def _layer_pairs(attn: str, prefix: str, ffns: Blocks, attentions: Blocks = _ENCODER_ATTENTIONS) -> Pairs:
    """Per-layer pairs; `attn` is the inner attention name: 'attention' (HF Blip2) or 'self' (BERT, BLIP)."""
    layer = prefix + "encoder.layer.{i}."
    pairs: Pairs = []
    for ours, theirs in attentions:
        pairs += [(f"layers.{{i}}.{ours}.{p}.", f"{layer}{theirs}.{attn}.{p}.") for p in ("query", "key", "value")]
        pairs += [(f"layers.{{i}}.{ours}.out.", f"{layer}{theirs}.output.dense."),
                  (f"layers.{{i}}.{ours}.norm.", f"{layer}{theirs}.output.LayerNorm.")]
    for ours, suffix in ffns:
        pairs += [(f"layers.{{i}}.{ours}.fc1.", f"{layer}intermediate{suffix}.dense."),
                  (f"layers.{{i}}.{ours}.fc2.", f"{layer}output{suffix}.dense."),
                  (f"layers.{{i}}.{ours}.norm.", f"{layer}output{suffix}.LayerNorm.")]
    return pairs


# layout: (Q-Former prefix, name of our embeddings.norm, prefix of the text embeddings or None, text FFN?)
QFORMER_LAYOUTS: dict[str, tuple[str, str, Optional[str], bool]] = {
    "blip2_qformer": ("", "layernorm.", None, True),
    "instructblip_qformer": ("", "embeddings.layernorm.", "embeddings.", True),
    "blip2_retrieval": ("qformer.", "qformer.layernorm.", "embeddings.", True),
    "blip2_generation": ("qformer.", "qformer.layernorm.", None, False),
    "instructblip_generation": ("qformer.", "qformer.embeddings.layernorm.", "qformer.embeddings.", True),
}


def _qformer_pairs(layout: str) -> tuple[Pairs, tuple[str, ...]]:
    """(pairs, our key prefixes with no counterpart in `layout`)."""
    if layout not in QFORMER_LAYOUTS:
        raise ValueError(f"unknown Q-Former layout {layout!r}: one of {', '.join(QFORMER_LAYOUTS)}")
    prefix, norm, text_emb, text_ffn = QFORMER_LAYOUTS[layout]
    pairs = _layer_pairs("attention", prefix, _QFORMER_FFNS if text_ffn else _QFORMER_FFNS[:1])
    pairs += [("embeddings.norm.", norm)]
    absent: tuple[str, ...] = ("lm_head.",)
    if text_emb is None:
        absent += ("embeddings.word_embeddings.", "embeddings.position_embeddings.")
    else:
        pairs += [(f"embeddings.{e}.", f"{text_emb}{e}.") for e in ("word_embeddings", "position_embeddings")]
    if not text_ffn:
        absent += ("layers.{i}.ffn.",)
    return pairs, absent


def qformer_keys_without_hf(keys: list[str], layout: str) -> list[str]:
    """Our Q-Former keys that `layout` has no place for (left out by `qformer_to_hf`)."""
    _, absent = _qformer_pairs(layout)
    return [k for k in keys if _starts(k, absent)]


def qformer_to_hf(sd: Mapping[str, torch.Tensor], layout: str = "blip2_qformer") -> dict[str, torch.Tensor]:
    """QFormer keys -> HF keys of `layout`; keys without a counterpart (see above) are left out."""
    pairs, absent = _qformer_pairs(layout)
    out = {}
    for key, value in sd.items():
        name = _translate(key, pairs)
        if name is not None:
            out[name] = value
        elif not _starts(key, absent):
            raise ValueError(f"Q-Former key {key!r} is unknown")
    return out


def qformer_from_hf(sd: Mapping[str, torch.Tensor], layout: str = "blip2_qformer") -> dict[str, torch.Tensor]:
    """HF Q-Former keys of `layout` (only those; split full models with `model_from_hf`) -> ours."""
    pairs = _swap(_qformer_pairs(layout)[0])
    out = {}
    for key, value in sd.items():
        name = _translate(key, pairs)
        if name is None:
            raise ValueError(f"{layout} key {key!r} has no counterpart in QFormer")
        out[name] = value
    return out


def _bert_body_pairs(prefix: str, ffns: Blocks, attentions: Blocks = _ENCODER_ATTENTIONS) -> Pairs:
    """A BertModel's embeddings and layers under `prefix` (BERT, LAVIS, BLIP, transformers' BlipTextModel)."""
    return _layer_pairs("self", prefix, ffns, attentions) + [
        ("embeddings.word_embeddings.", f"{prefix}embeddings.word_embeddings."),
        ("embeddings.position_embeddings.", f"{prefix}embeddings.position_embeddings."),
        ("embeddings.norm.", f"{prefix}embeddings.LayerNorm."),
    ]


_MLM_HEAD_PAIRS: Pairs = [
    ("lm_head.dense.", "cls.predictions.transform.dense."),
    ("lm_head.norm.", "cls.predictions.transform.LayerNorm."),
    ("lm_head.decoder.weight", "cls.predictions.decoder.weight"),
    ("lm_head.decoder.bias", "cls.predictions.bias"),
]
"""BERT's MLM head (BertForMaskedLM, BLIP's BertLMHeadModel); `cls.predictions.decoder.bias` is the same
tensor as `cls.predictions.bias`."""

_BERT_PAIRS: Pairs = _bert_body_pairs("bert.", _QFORMER_FFNS) + _MLM_HEAD_PAIRS
# BERT pieces the Q-Former does not have (one segment, no pooler / next-sentence head).
_BERT_WITHOUT_COUNTERPART = ("bert.embeddings.token_type_embeddings.", "bert.embeddings.position_ids",
                             "bert.pooler.", "cls.seq_relationship.")


def qformer_from_bert(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERT (BertModel / BertForMaskedLM) or LAVIS `Qformer.*`-stripped keys -> ours.

    Accepts keys with or without the `bert.` prefix and old `gamma`/`beta` LayerNorm names; BERT's
    token-type embeddings, pooler and NSP head are dropped.
    """
    out = {}
    for key, value in sd.items():
        if not key.startswith(("bert.", "cls.")):
            key = "bert." + key
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        if key == "cls.predictions.decoder.bias":  # the same tensor as cls.predictions.bias (tied)
            key = "cls.predictions.bias"
        if key.startswith(_BERT_WITHOUT_COUNTERPART):
            continue
        name = _translate(key, _swap(_BERT_PAIRS))
        if name is None:
            raise ValueError(f"BERT key {key!r} has no counterpart in QFormer")
        out[name] = value
    return out


def qformer_to_bert(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> BERT / LAVIS names (`bert.*`, `cls.predictions.*`, both tied bias names)."""
    out = {}
    for key, value in sd.items():
        name = _translate(key, _BERT_PAIRS)
        if name is None:
            raise ValueError(f"Q-Former key {key!r} is unknown")
        out[name] = value
        if name == "cls.predictions.bias":
            out["cls.predictions.decoder.bias"] = value
    return out


# --------------------------------------------------------------------------------------------- MED

MED_VIEWS = ("encoder", "decoder")
"""The transformers classes one MED maps to. encoder: BlipTextModel (BLIP's `text_encoder`, no pooler);
decoder: BlipTextLMHeadModel (`text_decoder`), whose `attention` is our `self_attn_dec` (all else shared)."""


def _med_pairs(view: str) -> tuple[Pairs, tuple[str, ...]]:
    """(pairs, our key prefixes with no counterpart in `view`)."""
    if view == "encoder":
        return _bert_body_pairs("", _TEXT_FFNS), ("layers.{i}.self_attn_dec.", "lm_head.")
    if view == "decoder":
        return (_bert_body_pairs("bert.", _TEXT_FFNS, _DECODER_ATTENTIONS) + _MLM_HEAD_PAIRS,
                ("layers.{i}.self_attn.",))
    raise ValueError(f"unknown MED view {view!r}: one of {', '.join(MED_VIEWS)}")


def med_keys_without_hf(keys: list[str], view: str) -> list[str]:
    """Our MED keys that `view` has no place for (left out by `med_to_hf`): the decoder self-attention and
    LM head in the encoder view, the encoder self-attention in the decoder view."""
    _, absent = _med_pairs(view)
    return [k for k in keys if _starts(k, absent)]


def med_to_hf(sd: Mapping[str, torch.Tensor], view: str = "encoder") -> dict[str, torch.Tensor]:
    """MED keys -> BlipTextModel (`encoder`) or BlipTextLMHeadModel (`decoder`) keys; keys without a
    counterpart in `view` (see `med_keys_without_hf`) are left out."""
    pairs, absent = _med_pairs(view)
    out = {}
    for key, value in sd.items():
        name = _translate(key, pairs)
        if name is not None:
            out[name] = value
            if name == "cls.predictions.bias":  # transformers' state dict also lists the tied alias
                out["cls.predictions.decoder.bias"] = value
        elif not _starts(key, absent):
            raise ValueError(f"MED key {key!r} is unknown")
    return out


def med_from_hf(sd: Mapping[str, torch.Tensor], view: str = "encoder") -> dict[str, torch.Tensor]:
    """BlipTextModel (`encoder`) or BlipTextLMHeadModel (`decoder`) keys -> MED keys (unknown keys raise).

    Our LM head's decoder is the word-embedding matrix: a different `cls.predictions.decoder.weight` raises.
    """
    pairs = _swap(_med_pairs(view)[0])
    out = {}
    for key, value in sd.items():
        if key == "cls.predictions.decoder.bias":  # the same tensor as cls.predictions.bias (tied)
            key = "cls.predictions.bias"
        name = _translate(key, pairs)
        if name is None:
            raise ValueError(f"BLIP text {view} key {key!r} has no counterpart in MED")
        out[name] = value
    decoder, words = out.get("lm_head.decoder.weight"), out.get("embeddings.word_embeddings.weight")
    if decoder is not None and (words is None or not torch.equal(decoder, words)):
        raise ValueError("cls.predictions.decoder.weight differs from the word embeddings (MED ties them)")
    return out


BLIP_TEXT_PARTS = {"text_encoder": "encoder", "text_encoder_m": "encoder", "text_decoder": "decoder"}
"""Text parts of the authors' BLIP checkpoints and the MED view each one is (`_m`: the momentum copy)."""


def med_from_blip(sd: Mapping[str, torch.Tensor], part: str = "text_encoder") -> dict[str, torch.Tensor]:
    """One text part of an authors' BLIP checkpoint (model_base*.pth, model_large*.pth) -> MED keys.

    `text_encoder.*` (and `text_encoder_m.*`) hold BertModel names, as transformers' BlipTextModel;
    `text_decoder.bert.*` / `text_decoder.cls.*` as BlipTextLMHeadModel. The checkpoint's other keys (vision,
    projections, heads, other parts) are ignored here; the persistent `position_ids` buffer is dropped. The
    pretraining checkpoints tie the decoder to the encoder except the self-attention, so both parts merge
    into one MED; the VQA checkpoints' encoder and decoder are separate models (two MEDs).
    """
    if part not in BLIP_TEXT_PARTS:
        raise ValueError(f"unknown BLIP text part {part!r}: one of {', '.join(BLIP_TEXT_PARTS)}")
    prefix = part + "."
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not own:
        raise ValueError(f"the checkpoint has no {prefix}* keys")
    return med_from_hf({k: v for k, v in own.items() if not k.endswith("embeddings.position_ids")},
                       BLIP_TEXT_PARTS[part])


def read_hf_folder_weights(folder: Union[str, Path]) -> dict[str, torch.Tensor]:
    """All tensors of a local HF model folder: single or sharded safetensors / pytorch_model.bin."""
    folder = Path(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(read_state_dict(folder / shard))
            return sd
    raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")


# -------------------------------------------------------------------------------------- full models

DEFAULT_NAMES = {"vision": "visual_encoder.", "ln_vision": "ln_vision.", "qformer": "qformer.",
                 "query_tokens": "query_tokens", "vision_proj": "vision_proj.", "text_proj": "text_proj.",
                 "itm_head": "itm_head.", "llm_proj": "llm_proj.", "llm": "llm."}
"""Attribute names of the parts in our BLIP-2 models (LAVIS's, with `llm_proj` / `llm` generic)."""

_HF_TOP = {"query_tokens": "query_tokens", "vision_proj": "vision_projection.", "text_proj": "text_projection.",
           "itm_head": "itm_head.", "llm_proj": "language_projection.", "llm": "language_model."}
_LAYOUT_PARTS = {"blip2_retrieval": ("query_tokens", "vision_proj", "text_proj", "itm_head"),
                 "blip2_generation": ("query_tokens", "llm_proj", "llm"),
                 "instructblip_generation": ("query_tokens", "llm_proj", "llm")}


def _top_pairs(layout: str, names: Mapping[str, str]) -> Pairs:
    if layout not in _LAYOUT_PARTS:
        raise ValueError(f"full-model layout must be one of {', '.join(_LAYOUT_PARTS)}, got {layout!r}")
    return [(names[p], _HF_TOP[p]) for p in _LAYOUT_PARTS[layout]]


def model_to_hf(sd: Mapping[str, torch.Tensor], layout: str,
                names: Mapping[str, str] = DEFAULT_NAMES) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A whole model's state dict -> (HF keys of the `layout` class, our keys left out)."""
    vision = {k[len(names["vision"]):]: v for k, v in sd.items() if k.startswith(names["vision"])}
    vision.update({"ln_vision." + k[len(names["ln_vision"]):]: v for k, v in sd.items()
                   if k.startswith(names["ln_vision"])})
    qformer = {k[len(names["qformer"]):]: v for k, v in sd.items() if k.startswith(names["qformer"])}
    out = {"vision_model." + k: v for k, v in vision_to_hf(vision).items()}
    out.update(qformer_to_hf(qformer, layout))
    left_out = [names["qformer"] + k for k in qformer_keys_without_hf(list(qformer), layout)]
    top = _top_pairs(layout, names)
    for key, value in sd.items():
        if key.startswith((names["vision"], names["ln_vision"], names["qformer"])):
            continue
        name = _translate(key, top)
        if name is None:
            left_out.append(key)
        else:
            out[name] = value
    return out, left_out


def model_from_hf(sd: Mapping[str, torch.Tensor], layout: str,
                  names: Mapping[str, str] = DEFAULT_NAMES) -> dict[str, torch.Tensor]:
    """HF state dict of the `layout` class -> our keys (unknown keys raise)."""
    q_prefix, _, text_emb, _ = QFORMER_LAYOUTS[layout]
    q_roots = (q_prefix,) + ((text_emb,) if text_emb else ())
    vision = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    qformer = {k: v for k, v in sd.items() if k.startswith(q_roots)}
    out = {}
    for key, value in vision_from_hf(vision).items():
        out[(names["ln_vision"] + key[len("ln_vision."):]) if key.startswith("ln_vision.")
            else names["vision"] + key] = value
    out.update({names["qformer"] + k: v for k, v in qformer_from_hf(qformer, layout).items()})
    top = _swap(_top_pairs(layout, names))
    for key, value in sd.items():
        if key.startswith(("vision_model.",) + q_roots):
            continue
        name = _translate(key, top)
        if name is None:
            raise ValueError(f"{layout} key {key!r} has no counterpart in our model")
        out[name] = value
    return out


# -------------------------------------------------------------------------------------------- LAVIS

LAVIS_PROJ = ("opt_proj.", "t5_proj.", "llm_proj.")
"""LAVIS's projection to the LLM: Blip2OPT, Blip2T5 / Blip2T5Instruct, Blip2VicunaInstruct -> our `llm_proj`."""
LAVIS_LLM = ("opt_model.", "t5_model.", "llm_model.")
"""LAVIS's frozen LLM (never taken from a LAVIS checkpoint: frozen towers come from their sources)."""
_LAVIS_SAME_PREFIX = ("visual_encoder.", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.")


def model_from_lavis(sd: Mapping[str, torch.Tensor],
                     names: Mapping[str, str] = DEFAULT_NAMES) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LAVIS BLIP-2 / InstructBLIP state dict -> (ours, LAVIS keys left out: the frozen LLM's).

    LAVIS: visual_encoder.* (EVA names, as ours), ln_vision.*, query_tokens, Qformer.bert.* / Qformer.cls.*
    (BERT names, see qformer_from_bert), vision_proj/text_proj/itm_head, temp (0-dim; ours is (1,)),
    {opt,t5,llm}_proj -> llm_proj, {opt,t5,llm}_model.* (left out). Unknown keys raise.
    """
    out: dict[str, torch.Tensor] = {}
    qformer: dict[str, torch.Tensor] = {}
    left_out = []
    for key, value in sd.items():
        if key.startswith("Qformer."):
            qformer[key[len("Qformer."):]] = value
        elif key.startswith(LAVIS_LLM):
            left_out.append(key)
        elif key.startswith(LAVIS_PROJ):
            out[names["llm_proj"] + key.split(".", 1)[1]] = value
        elif key == "temp":
            out["temp"] = value.reshape(1)
        elif key == "query_tokens":
            out[names["query_tokens"]] = value
        elif key.startswith(_LAVIS_SAME_PREFIX):
            root, rest = key.split(".", 1)
            out[names[{"visual_encoder": "vision"}.get(root, root)] + rest] = value
        else:
            raise ValueError(f"LAVIS key {key!r} has no counterpart in our models")
    q = qformer_from_bert(qformer)
    decoder = q.pop("lm_head.decoder.weight", None)  # BERT ties it to the word embeddings, as ours
    words = q.get("embeddings.word_embeddings.weight")
    if decoder is not None and (words is None or not torch.equal(decoder, words)):
        raise ValueError("Qformer.cls.predictions.decoder.weight differs from the word embeddings (ours are tied)")
    out.update({names["qformer"] + k: v for k, v in q.items()})
    return out, left_out


# ------------------------------------------------------------------------------------ BLIP (ViT + MED)

BLIP_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "blip_retrieval": (("text_encoder.", "encoder"),),
    "blip_captioning": (("text_decoder.", "decoder"),),
    "blip_vqa": (("text_encoder.", "encoder"), ("text_decoder.", "decoder")),
}
"""transformers' BLIP classes as (prefix, MED view) of their text parts: BlipForImageTextRetrieval,
BlipForConditionalGeneration, BlipForQuestionAnswering. Our BlipPretrain holds `visual_encoder.` (EVAViT with
final norm), `text.` (one MED), `vision_proj.`, `text_proj.`, `itm_head.`, `temp` and the momentum parts."""
BLIP_HEADS = ("vision_proj.", "text_proj.", "itm_head.")
"""Same names in ours and BlipForImageTextRetrieval (the other classes have none)."""


def _with_tied_lm_decoder(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Consolidated weights name the tied LM decoder once (as the word embeddings); the decoder view needs it."""
    if "embeddings.word_embeddings.weight" in text and "lm_head.dense.weight" in text:
        text.setdefault("lm_head.decoder.weight", text["embeddings.word_embeddings.weight"])
    return text


def blip_model_to_hf(sd: Mapping[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BlipPretrain state dict -> (HF keys of the `layout` class, our keys left out: momentum parts, temp, what
    the class's MED views have no place for, heads outside retrieval)."""
    if layout not in BLIP_LAYOUTS:
        raise ValueError(f"BLIP layout must be one of {', '.join(BLIP_LAYOUTS)}, got {layout!r}")
    vision = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    out = {"vision_model." + k: v for k, v in blip_vision_to_hf(vision).items()}
    # The MEDs: `text`, and a VQA model's own answer decoder `text_decoder` (untied), which then fills the
    # decoder view.
    meds = {root: _with_tied_lm_decoder({k[len(root) + 1:]: v for k, v in sd.items() if k.startswith(root + ".")})
            for root in ("text", "text_decoder")}
    placed = set()
    for n, (prefix, view) in enumerate(BLIP_LAYOUTS[layout]):
        root = "text_decoder" if view == "decoder" and meds["text_decoder"] else "text"
        part = med_to_hf(meds[root], view)
        # BlipForQuestionAnswering holds two separate text models: the second view of one MED gets its own copies
        # of the shared tensors (one storage under two untied names cannot be saved as safetensors).
        out.update({prefix + k: (v.clone() if n and root == "text" else v) for k, v in part.items()})
        placed |= {f"{root}.{k}" for k in set(meds[root]) - set(med_keys_without_hf(list(meds[root]), view))}
    heads = BLIP_HEADS if layout == "blip_retrieval" else ()
    if heads:
        out.update({k: v for k, v in sd.items() if k.startswith(heads)})
    left_out = [k for k in sd if not k.startswith(("visual_encoder.",) + heads) and k not in placed]
    return out, left_out


def blip_model_from_hf(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """HF state dict of BlipForImageTextRetrieval / BlipForConditionalGeneration -> our keys of one MED;
    BlipForQuestionAnswering (blip_vqa) -> a VQA model's keys: its text_encoder as `text` (encoder view), its
    text_decoder as the answer decoder `text_decoder` (decoder view), two MEDs. Unknown keys raise."""
    if layout not in BLIP_LAYOUTS:
        raise ValueError(f"BLIP layout must be one of {', '.join(BLIP_LAYOUTS)}, got {layout!r}")
    heads = BLIP_HEADS if layout == "blip_retrieval" else ()
    vision = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    out = {"visual_encoder." + k: v for k, v in blip_vision_from_hf(vision).items()}
    parts = BLIP_LAYOUTS[layout]
    for prefix, view in parts:
        root = "text_decoder" if len(parts) > 1 and view == "decoder" else "text"
        text = {k[len(prefix):]: v for k, v in sd.items()
                if k.startswith(prefix) and not k.endswith("embeddings.position_ids")}
        out.update({f"{root}.{k}": v for k, v in med_from_hf(text, view).items()})
        out.pop(f"{root}.lm_head.decoder.weight", None)  # the word embeddings (tied; checked by med_from_hf)
    for key, value in sd.items():
        if key.startswith(("vision_model.",) + tuple(prefix for prefix, _ in parts)):
            continue
        if not heads or not key.startswith(heads):
            raise ValueError(f"{layout} key {key!r} has no counterpart in our BLIP model")
        out[key] = value
    return out


BLIP_AUTHORS_MOMENTUM = {"visual_encoder_m.": "visual_encoder_m.", "vision_proj_m.": "vision_proj_m.",
                         "text_proj_m.": "text_proj_m."}
BLIP_AUTHORS_QUEUE = {"image_queue": "queue.image_queue", "text_queue": "queue.text_queue", "queue_ptr": "queue.ptr"}


def _merge_decoder(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> list[str]:
    """Add the decoder view's own parts (causal self-attention, LM head) to the encoder's MED keys; returns the
    shared keys whose two copies differ (a pretraining checkpoint ties them: none)."""
    differ = []
    for k, v in decoder.items():
        if ".self_attn_dec." in k or k.startswith("lm_head."):
            encoder[k] = v
        elif k in encoder and not torch.equal(encoder[k], v):
            differ.append(k)
    return differ


def is_blip_vqa_checkpoint(sd: Mapping[str, torch.Tensor]) -> bool:
    """The authors' BLIP VQA layout (model_*_vqa*.pth: ViT, text_encoder, an untied text_decoder; no ITC / ITM
    heads, no momentum model)."""
    return (any(k.startswith("text_decoder.") for k in sd) and not any(k.startswith("itm_head.") for k in sd)
            and not any(k.startswith("text_encoder_m.") for k in sd))


def blip_vqa_model_from_authors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' BLIP VQA checkpoint -> a model.objective=vqa model's keys: text_encoder as `text`, the untied
    text_decoder as the answer decoder `text_decoder`. Unknown keys raise."""
    vision = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    out = {"visual_encoder." + k: v for k, v in blip_vision_from_timm(vision).items()}
    for part, root in (("text_encoder", "text"), ("text_decoder", "text_decoder")):
        med = med_from_blip(sd, part)
        med.pop("lm_head.decoder.weight", None)  # tied to the word embeddings (checked by med_from_hf)
        out.update({f"{root}.{k}": v for k, v in med.items()})
    unknown = [k for k in sd if not k.startswith(("visual_encoder.", "text_encoder.", "text_decoder."))]
    if unknown:
        raise ValueError(f"BLIP VQA checkpoint key {unknown[0]!r} has no counterpart in our BLIP model")
    return out


def blip_model_from_authors(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The authors' BLIP pretraining checkpoint (model_base*.pth / model_large*.pth: timm ViT, BertModel text
    encoder, BertLMHeadModel decoder tied to it except the self-attention, heads, temp, momentum copies `*_m` and
    the feature queues) -> (our BlipPretrain keys, decoder keys that differ from the encoder's).

    Our momentum text encoder is unimodal: the authors' text_encoder_m cross-attention is not kept; its LM head
    (which BLIP's momentum model never runs) starts as the online one. Unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    vision = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    out.update({"visual_encoder." + k: v for k, v in blip_vision_from_timm(vision).items()})
    text = med_from_blip(sd, "text_encoder")
    differ = _merge_decoder(text, med_from_blip(sd, "text_decoder")) if any(
        k.startswith("text_decoder.") for k in sd) else []
    text.pop("lm_head.decoder.weight", None)  # tied to the word embeddings (checked by med_from_hf)
    out.update({"text." + k: v for k, v in text.items()})
    vision_m = {k[len("visual_encoder_m."):]: v for k, v in sd.items() if k.startswith("visual_encoder_m.")}
    out.update({"visual_encoder_m." + k: v for k, v in blip_vision_from_timm(vision_m).items()})
    if any(k.startswith("text_encoder_m.") for k in sd):
        text_m = med_from_blip(sd, "text_encoder_m")
        out.update({"text_m." + k: v for k, v in text_m.items() if ".cross_attn." not in k})
        out.update({"text_m." + k: v.clone() for k, v in text.items() if k.startswith("lm_head.")})  # own storage
    roots = ("visual_encoder.", "visual_encoder_m.", "text_encoder.", "text_encoder_m.", "text_decoder.")
    for key, value in sd.items():
        if key.startswith(roots):
            continue
        if key == "temp":
            out["temp"] = value.reshape(1)
        elif key in BLIP_AUTHORS_QUEUE:
            out[BLIP_AUTHORS_QUEUE[key]] = value.reshape(1) if key == "queue_ptr" else value
        elif key.startswith(BLIP_HEADS + tuple(BLIP_AUTHORS_MOMENTUM)):
            out[key] = value
        else:
            raise ValueError(f"BLIP checkpoint key {key!r} has no counterpart in our BLIP model")
    return out, differ
