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
  The MED and whole BLIP / ALBEF models: hf_names_blip.py.
BERT / LAVIS: bert.embeddings.*, bert.encoder.layer.{i}.{attention.self,crossattention.self,...},
  intermediate(_query), output(_query), cls.predictions.* (qformer_from_bert / qformer_to_bert; the
  same names initialise a MED from BERT).
BLIP (authors' checkpoints): visual_encoder.* timm ViT names (blip_vision_from_timm: ours but a full qkv
  bias); the text parts and whole checkpoints: hf_names_blip.py.
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

