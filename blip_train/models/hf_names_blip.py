"""BLIP's and ALBEF's name mappings: the MED (models/med.py) and whole BLIP models against transformers' BLIP
classes and the authors' checkpoints (the ViT, BERT and LAVIS tables live in hf_names.py).

  MED (MED_VIEWS): BlipTextModel (`encoder`: embeddings.*, encoder.layer.{i}.{attention,crossattention}.*)
    and BlipTextLMHeadModel (`decoder`: bert.* with `attention` = our self_attn_dec, cls.predictions.*).
  BLIP whole models (BLIP_LAYOUTS, blip_model_to_hf / blip_model_from_hf): BlipPretrain's visual_encoder /
    text / heads as BlipForImageTextRetrieval, BlipForConditionalGeneration, BlipForQuestionAnswering (a VQA
    model's answer decoder `text_decoder` as its text_decoder).
  BLIP (authors' checkpoints): visual_encoder.* timm ViT names (blip_vision_from_timm: ours but a full qkv
    bias), text_encoder.* / text_decoder.* as the transformers text classes (med_from_blip); whole pretraining
    checkpoints with momentum copies and queues: blip_model_from_authors; VQA checkpoints (an untied
    text_decoder): blip_vqa_model_from_authors.
  ALBEF (authors' checkpoints): the same ViT names, text_encoder.* as a BertForMaskedLM (the `masked_lm` view,
    token-type embedding 0 folded into the position embeddings): albef_model_from_authors.
"""
from __future__ import annotations

from typing import Mapping

import torch

from blip_train.models.hf_names import (_DECODER_ATTENTIONS, _MLM_HEAD_PAIRS, _TEXT_FFNS, Pairs, _bert_body_pairs,
                                        _starts, _swap, _translate, blip_vision_from_hf, blip_vision_from_timm,
                                        blip_vision_to_hf)

# --------------------------------------------------------------------------------------------- MED

MED_VIEWS = ("encoder", "decoder", "masked_lm")
"""The BERT classes one MED maps to. encoder: BlipTextModel (BLIP's `text_encoder`, no pooler); decoder:
BlipTextLMHeadModel (`text_decoder`), whose `attention` is our `self_attn_dec` (all else shared); masked_lm:
ALBEF's BertForMaskedLM (its `text_encoder`: bert.* with the encoder's self-attention, cls.predictions.*)."""


def _med_pairs(view: str) -> tuple[Pairs, tuple[str, ...]]:
    """(pairs, our key prefixes with no counterpart in `view`)."""
    if view == "encoder":
        return _bert_body_pairs("", _TEXT_FFNS), ("layers.{i}.self_attn_dec.", "lm_head.")
    if view == "decoder":
        return (_bert_body_pairs("bert.", _TEXT_FFNS, _DECODER_ATTENTIONS) + _MLM_HEAD_PAIRS,
                ("layers.{i}.self_attn.",))
    if view == "masked_lm":
        return _bert_body_pairs("bert.", _TEXT_FFNS) + _MLM_HEAD_PAIRS, ("layers.{i}.self_attn_dec.",)
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
    out.update(_authors_loose_keys(sd, roots, "BLIP"))
    return out, differ


def _authors_loose_keys(sd: Mapping[str, torch.Tensor], towers: tuple[str, ...],
                        family: str) -> dict[str, torch.Tensor]:
    """The keys of an authors' BLIP / ALBEF checkpoint outside its towers (`towers`, converted by the caller):
    the temperature, the feature queues, the ITC / ITM heads and their momentum copies. Unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(towers):
            continue
        if key == "temp":
            out["temp"] = value.reshape(1)
        elif key in BLIP_AUTHORS_QUEUE:
            out[BLIP_AUTHORS_QUEUE[key]] = value.reshape(1) if key == "queue_ptr" else value
        elif key.startswith(BLIP_HEADS + tuple(BLIP_AUTHORS_MOMENTUM)):
            out[key] = value
        else:
            raise ValueError(f"{family} checkpoint key {key!r} has no counterpart in our {family} model")
    return out


def is_albef_checkpoint(sd: Mapping[str, torch.Tensor]) -> bool:
    """The authors' ALBEF layout: its text encoder is a BertForMaskedLM (`text_encoder.bert.*`, `text_encoder.cls.*`)."""
    return any(k.startswith("text_encoder.bert.") for k in sd)


def _albef_text(own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One ALBEF BertForMaskedLM (keys without the part prefix) -> MED keys. BERT adds token-type embedding 0 to
    every position (ALBEF never passes another type); our MED has no token types, so that row joins the position
    embeddings: the embedding sums are the same."""
    own = {k: v for k, v in own.items() if not k.endswith("embeddings.position_ids")}
    token_types = own.pop("bert.embeddings.token_type_embeddings.weight", None)
    if token_types is not None:
        key = "bert.embeddings.position_embeddings.weight"
        own[key] = own[key] + token_types[0]
    med = med_from_hf(own, "masked_lm")
    med.pop("lm_head.decoder.weight", None)  # tied to the word embeddings (checked by med_from_hf)
    return med


def albef_model_from_authors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' ALBEF pretraining checkpoint (ALBEF_4M.pth, ALBEF.pth: timm ViT, a BertForMaskedLM text encoder
    whose layers from fusion_layer on cross-attend, heads, temp, momentum copies `*_m` and the feature queues) ->
    our model.arch=albef keys. Unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    for root in ("visual_encoder.", "visual_encoder_m."):
        vision = {k[len(root):]: v for k, v in sd.items() if k.startswith(root)}
        if vision:
            out.update({root + k: v for k, v in blip_vision_from_timm(vision).items()})
    for part, root in (("text_encoder.", "text."), ("text_encoder_m.", "text_m.")):
        own = {k[len(part):]: v for k, v in sd.items() if k.startswith(part)}
        if own:
            out.update({root + k: v for k, v in _albef_text(own).items()})
    out.update(_authors_loose_keys(sd, ("visual_encoder.", "visual_encoder_m.", "text_encoder.", "text_encoder_m."),
                                   "ALBEF"))
    return out
