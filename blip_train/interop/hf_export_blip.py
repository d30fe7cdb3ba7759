"""tools/export_hf.py for model.arch=blip: a BLIP run (ViT + MED) as transformers' BlipForImageTextRetrieval,
BlipForConditionalGeneration or BlipForQuestionAnswering (`export_blip_hf`); hf_export.export_hf dispatches
here. A fine-tuning run (model.objective retrieval | caption | vqa) exports to the class of what it trained only."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from blip_train.config import ExperimentConfig
from blip_train.interop.hf_config import (BLIP_CLASSES, assign_into, blip_class, blip_generation_config,
                                          blip_hf_config_for, build_blip_processor, carry_generation_defaults_)
from blip_train.interop.hf_export import ExportSource, write_hf_folder
from blip_train.interop.weights_io import InteropError, dtype_name, is_weights_file, is_weights_folder
from blip_train.models.hf_names_blip import blip_model_to_hf

BLIP_ARCHS = ("blip", "albef")
BLIP_NOT_EXPORTED = (r"[a-z_]+_m\.", r"queue\.", r"temp$")
"""Keys of a BlipPretrain weights file that no BLIP class has a place for: the momentum copies and feature
queue (training state of the ITC loss; transformers' classes have no momentum parts) and the ITC temperature
(written as config.logit_scale_init_value instead, see hf_config.blip_hf_config_for)."""


BLIP_OBJECTIVE_CLASSES = {"retrieval": ("BlipForImageTextRetrieval",), "caption": ("BlipForConditionalGeneration",),
                          "vqa": ("BlipForQuestionAnswering",)}
"""The one class a fine-tuning run exports to (a pretraining run: any of the three)."""


def recorded_model(source: Union[str, Path], tag: Optional[str]) -> dict:
    """The `model` section a run / checkpoint recorded, read without merging or verifying its shards ({} when
    there is none to read here: load_export_source then says what is wrong)."""
    from blip_train.interop.consolidate import find_checkpoint, run_config

    p = Path(source)
    if is_weights_folder(p) or is_weights_file(p):
        return {}
    try:
        ckpt_dir, tag = find_checkpoint(p, tag)
    except (InteropError, OSError):
        return {}
    return (run_config(ckpt_dir, tag) or {}).get("model") or {}


def check_blip_objective_class(model: dict, class_name: str, where: str) -> None:
    """A BLIP fine-tuning run exports to the class of what it trained (BLIP_OBJECTIVE_CLASSES) only."""
    allowed = BLIP_OBJECTIVE_CLASSES.get(model.get("objective", "pretrain")) if model.get("arch") == "blip" else None
    if allowed is not None and class_name not in allowed:
        raise InteropError(f"{where}: a model.objective={model['objective']} run trains the parts of {allowed[0]} "
                           f"only (the rest stayed frozen at its model.init_from); export it with --hf-class "
                           f"{allowed[0]}")


def expected_blip_trained(cfg: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of BlipPretrain's trainable parameters (built on the meta device: no memory)."""
    from blip_train.models.blip import BlipPretrain, TextTokens

    with torch.device("meta"):
        model = BlipPretrain(cfg.model, TextTokens(pad=0, cls=0, sep=0, mask=0, enc=0, dec=0, vocab_size=1))
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _check_blip_trained(weights: dict, expected: dict, where: str) -> dict[str, torch.Tensor]:
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected and not any(re.match(p, k) for p in BLIP_NOT_EXPORTED)
                  and k not in ("text.lm_head.decoder.weight", "text_decoder.lm_head.decoder.weight")]  # tied aliases
    if missing or unexpected:
        raise InteropError(f"{where}: weights do not match a model.arch=blip model of this config: missing "
                           f"{missing[:4]}, unexpected {unexpected[:4]}")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            raise InteropError(f"{where}: {k} has shape {tuple(weights[k].shape)}, the config's model expects {shape} "
                               "(model.vision / model.text sizes differ from the weights?)")
    return {k: weights[k] for k in expected}


def export_blip_hf(src: ExportSource, out: Path, where: str, class_name: str, target: torch.dtype,
                   max_shard_size: str, log: Callable[[str], None]) -> dict:
    """A BLIP pretraining model (ViT + MED) as one transformers class:
    BlipForImageTextRetrieval        vision_model, text_encoder (MED encoder view), vision_proj, text_proj, itm_head
    BlipForConditionalGeneration     vision_model, text_decoder (MED decoder view, LM head tied to its embeddings)
    BlipForQuestionAnswering         vision_model, text_encoder and text_decoder (a VQA run's MED and its own
                                     answer decoder; a pretraining run's one MED in both views, the start of the
                                     authors' VQA fine-tuning, which then unties them)
    with a BlipProcessor (BLIP's tokenizer, the image processor of our eval transform). Left out: the momentum
    copies and queue (no BLIP class has them) and the temperature (config.logit_scale_init_value = ln(1/temp))."""
    from blip_train.data.tokenizers import load_blip_tokenizer

    m = src.cfg.model
    if m.arch != "blip":
        raise InteropError(f"{where}: model.arch={m.arch} (ALBEF) has no transformers class (its text transformer "
                           "splits into text and fusion layers); only model.arch=blip exports")
    cls = blip_class(class_name)
    check_blip_objective_class({"arch": m.arch, "objective": m.objective}, class_name, where)
    if m.objective == "vqa" and m.vision.width != m.text.hidden_size:
        raise InteropError(f"{where}: transformers' BlipForQuestionAnswering builds its answer decoder's "
                           f"cross-attention as wide as the ViT ({m.vision.width}), ours reads the question's "
                           f"{m.text.hidden_size}-wide states (as the authors' blip_vqa): a ViT-B run exports, this "
                           "one does not")
    if not m.text.tokenizer or not Path(m.text.tokenizer).is_dir():
        raise InteropError(f"model.text.tokenizer: {m.text.tokenizer or '(empty)'} is not a tokenizer folder (the "
                           "exported processor needs it)")
    tokenizer = load_blip_tokenizer(m.text.tokenizer)
    trained = _check_blip_trained(src.weights, expected_blip_trained(src.cfg), where)
    log(f"source: model.arch=blip, {len(src.weights)} tensors -> {class_name}")
    hf_sd, left_out = blip_model_to_hf(trained, BLIP_CLASSES[class_name])
    hf_sd = {k: (t.to(target) if t.is_floating_point() else t) for k, t in hf_sd.items()}
    # A captioning or VQA run does not train the temperature (read by retrieval only): the config keeps BLIP's 0.07.
    temp = float(trained["temp"].reshape(())) if "temp" in trained else 0.07
    hf_cfg = blip_hf_config_for(m, tokenizer, class_name, temp=temp)
    hf_cfg.dtype = target
    gen = _blip_decoding_defaults(src.cfg, tokenizer, class_name)
    if gen is not None:
        # generate() hands over to text_decoder.generate, whose generation config transformers builds from
        # text_config on loading (as for BLIP-2, see hf_config.carry_generation_defaults_).
        carry_generation_defaults_(hf_cfg.text_config, gen)
    with torch.device("meta"):
        model = cls(hf_cfg)
    result = assign_into(model, hf_sd, class_name)
    if result.missing_keys or result.unexpected_keys:
        raise InteropError(f"{class_name} state mismatch: missing {result.missing_keys[:4]}, unexpected "
                           f"{result.unexpected_keys[:4]}")
    if gen is not None:
        model.generation_config = gen
    left_out += [k for k in src.weights if k not in trained]
    summary = {"arch": "blip", "class": class_name, "dtype": dtype_name(target),
               "left_out": _module_names(left_out), "tensors": len(hf_sd),
               "source": src.meta.get("source", {"path": where})}
    write_hf_folder(out, model, build_blip_processor(m.vision.image_size, tokenizer), summary, max_shard_size, log)
    return summary


def _blip_decoding_defaults(cfg: ExperimentConfig, tokenizer: Any, class_name: str) -> Any:
    """The run's eval decoding settings for a class that generates (captioning, VQA); None for retrieval."""
    e = cfg.eval
    if class_name == "BlipForConditionalGeneration":
        return blip_generation_config(tokenizer, e.num_beams, e.max_new_tokens, e.min_new_tokens, e.length_penalty)
    if class_name == "BlipForQuestionAnswering":
        return blip_generation_config(tokenizer, e.num_beams, e.vqa_max_new_tokens, 1, e.vqa_length_penalty)
    return None


def _module_names(keys: list[str]) -> list[str]:
    """Left-out keys by module (per-layer keys collapse), for the summary line."""
    return sorted({re.sub(r"\.\d+\.", ".*.", k).rsplit(".", 1)[0] if "." in k else k for k in keys})
