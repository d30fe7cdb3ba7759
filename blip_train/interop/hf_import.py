"""A transformers BLIP-2 / InstructBLIP folder -> a weights folder of ours, ready for `model.init_from`.

    OUT/model.safetensors          trained parts in our names (ln_vision, qformer.*, query_tokens, heads /
                                   llm_proj) — what init_from loads
    OUT/blip_train_weights.json    metadata + the equivalent `model:` config (paths relative to OUT)
    OUT/vision.safetensors         the frozen ViT in EVA names            -> model.vision.weights
    OUT/llm/                       the frozen LLM as an HF folder + its tokenizer   -> model.llm.path
    OUT/qformer_tokenizer/         the Q-Former's BERT tokenizer         -> model.qformer.tokenizer
    OUT/config_snippet.yaml        that `model:` section with absolute paths, to paste into a recipe
transformers' fused vision qkv bias keeps a k part that EVA does not have; it is dropped (softmax is
invariant to it), and a non-zero one is reported.

BLIP (model_type "blip", see `import_blip_hf`): a BlipForImageTextRetrieval folder, optionally with a
BlipForConditionalGeneration folder for the MED's decoder parts, or a BlipForQuestionAnswering folder (a VQA
model, model.objective=vqa), becomes a model.arch=blip weights folder:
    OUT/model.safetensors          the trainable BlipPretrain weights (ViT, text.*, heads, temp)
    OUT/tokenizer/                 the BLIP tokenizer                    -> model.text.tokenizer
    OUT/blip_train_weights.json, OUT/config_snippet.yaml   as above
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import yaml

from blip_train.interop.hf_config import (LAYOUTS, arch_of_hf_config, assign_into, blip_class, hf_class,
                                          model_section_from_blip_hf, model_section_from_hf, without_decoding_defaults)
from blip_train.interop.weights_io import InteropError, check_output, replacing, write_weights
from blip_train.models.hf_names import model_from_hf, read_hf_folder_weights
from blip_train.models.hf_names_blip import blip_model_from_hf

VISION_FILE = "vision.safetensors"
LLM_DIR = "llm"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
SNIPPET = "config_snippet.yaml"


def read_hf_model(hf_dir: Path) -> tuple[Any, str, dict[str, torch.Tensor]]:
    """(config, arch, complete state dict incl. tied aliases) of a local BLIP-2 / InstructBLIP folder."""
    from transformers import AutoConfig

    if not (hf_dir / "config.json").is_file():
        raise InteropError(f"{hf_dir}: not a transformers model folder (no config.json)")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise InteropError(f"{hf_dir}: unreadable config.json ({str(e).splitlines()[0][:200]})") from None
    if hf_cfg.model_type not in ("blip-2", "instructblip"):
        raise InteropError(f"{hf_dir}: model_type {hf_cfg.model_type!r} is not BLIP-2 / InstructBLIP")
    arch = arch_of_hf_config(hf_cfg, str(hf_dir))
    return hf_cfg, arch, read_through_class(hf_dir, hf_class(arch), hf_cfg)


def read_through_class(folder, cls, hf_cfg) -> dict[str, torch.Tensor]:
    """The folder's weights as `cls` (built on the meta device from `hf_cfg`) names them: tied weights saved once
    come back under every name, and anything missing or extra is caught against transformers' own parameter
    list (InteropError)."""
    try:
        sd = read_hf_folder_weights(folder)
    except FileNotFoundError as e:
        raise InteropError(str(e)) from None
    with torch.device("meta"):
        model = cls(hf_cfg)
    result = assign_into(model, sd, str(folder))
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or result.unexpected_keys:
        raise InteropError(f"{folder}: weights do not match {cls.__name__}: missing {still_meta[:4]}, "
                           f"unexpected {result.unexpected_keys[:4]}")
    return {k: t for k, t in model.state_dict().items() if not t.is_meta}


def nonzero_k_bias(sd: dict[str, torch.Tensor]) -> list[str]:
    out = []
    for k, t in sd.items():
        if k.startswith("vision_model.") and k.endswith("self_attn.qkv.bias") and t.chunk(3)[1].abs().max() > 0:
            out.append(k)
    return out


def _save_llm(llm_sd: dict[str, torch.Tensor], text_config: Any, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        llm = cls.from_config(text_config)
    result = assign_into(llm, llm_sd, "language model")
    if result.missing_keys or result.unexpected_keys:
        raise InteropError(f"language model weights do not match {type(llm).__name__}: missing "
                           f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")
    llm.save_pretrained(str(folder), safe_serialization=True)


def _load_tokenizer(src: Path) -> Optional[Any]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError):
        return None


def import_hf(hf_dir: Union[str, Path], out: Union[str, Path], *, overwrite: bool = False,
              decoder: Optional[Union[str, Path]] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Convert a transformers BLIP-2 / InstructBLIP / BLIP folder into a weights folder of ours (see module doc).
    `decoder`: a BlipForConditionalGeneration folder that supplies a BLIP retrieval folder's decoder parts."""
    from safetensors.torch import save_file

    hf_dir, out = Path(hf_dir), Path(out)
    check_output(out, overwrite)
    if _model_type(hf_dir) == "blip":
        return import_blip_hf(hf_dir, out, None if decoder is None else Path(decoder), log)
    if decoder is not None:
        raise InteropError(f"--decoder applies to BLIP (model_type blip) folders; {hf_dir} is not one")
    hf_cfg, arch, sd = read_hf_model(hf_dir)
    log(f"{hf_dir}: {hf_class(arch).__name__} -> model.arch={arch}")
    notes = [f"dropped a non-zero k bias in {len(ks)} vision layers (softmax-invariant)"
             for ks in [nonzero_k_bias(sd)] if ks]
    try:
        ours = model_from_hf(sd, LAYOUTS[arch])
    except ValueError as e:
        raise InteropError(f"{hf_dir}: {e}") from None
    vision = {k[len("visual_encoder."):]: t.contiguous() for k, t in ours.items() if k.startswith("visual_encoder.")}
    llm = {k[len("llm."):]: t for k, t in ours.items() if k.startswith("llm.")}
    trained = {k: t for k, t in ours.items() if not k.startswith(("visual_encoder.", "llm."))}

    model = model_section_from_hf(hf_cfg, str(hf_dir))
    model["vision"]["weights"] = VISION_FILE
    with replacing(out) as tmp:
        meta = {"arch": arch, "contents": "trainable", "names": "blip_train", "paths_relative_to_folder": True,
                "source": {"hf": str(hf_dir.resolve()), "class": hf_class(arch).__name__}, "notes": notes,
                "image_token_index": getattr(hf_cfg, "image_token_index", None)}
        qformer_tok = llm_tok = None
        if arch != "stage2":
            tok_src = hf_dir / QFORMER_TOKENIZER_DIR if arch == "instruct" else hf_dir
            qformer_tok = _load_tokenizer(tok_src)
            if qformer_tok is not None:
                model["qformer"]["tokenizer"] = QFORMER_TOKENIZER_DIR
            else:
                notes.append(f"no Q-Former tokenizer in {tok_src}: set model.qformer.tokenizer yourself")
        if arch != "stage1":
            model["llm"] = {"path": LLM_DIR}
            llm_tok = _load_tokenizer(hf_dir)
            if llm_tok is None:
                notes.append(f"no LLM tokenizer in {hf_dir}: add one to {out / LLM_DIR}")
        meta["config"] = {"model": model}
        write_weights(trained, tmp, meta)  # creates tmp/ with model.safetensors + metadata
        save_file(vision, str(tmp / VISION_FILE), metadata={"format": "pt"})
        if qformer_tok is not None:
            qformer_tok.save_pretrained(str(tmp / QFORMER_TOKENIZER_DIR))
        if arch != "stage1":
            log(f"language model: {type(hf_cfg.text_config).__name__} -> {out / LLM_DIR}")
            _save_llm(llm, without_decoding_defaults(hf_cfg.text_config), tmp / LLM_DIR)
            if llm_tok is not None:
                llm_tok.save_pretrained(str(tmp / LLM_DIR))
        snippet = json.loads(json.dumps(model))
        for section, key in (("vision", "weights"), ("qformer", "tokenizer"), ("llm", "path")):
            if snippet.get(section, {}).get(key):
                snippet[section][key] = str((out / snippet[section][key]).resolve())
        snippet["init_from"] = str(out.resolve())
        (tmp / SNIPPET).write_text(yaml.safe_dump({"model": snippet}, sort_keys=False))
    return {"arch": arch, "class": hf_class(arch).__name__, "trained_tensors": len(trained),
            "vision_tensors": len(vision), "llm_tensors": len(llm), "notes": notes, "out": str(out)}


# ----------------------------------------------------------------------------------- BLIP (ViT + MED)

BLIP_TOKENIZER_DIR = "tokenizer"


def _model_type(hf_dir: Path) -> Optional[str]:
    try:
        return json.loads((hf_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None  # read_hf_model names the problem


def read_blip_folder(folder: Path, class_name: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(BlipConfig, complete state dict) of a local transformers BLIP folder of `class_name`, checked against
    the class itself (tied weights saved once come back under every name)."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise InteropError(f"{folder}: not a transformers model folder (no config.json)")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise InteropError(f"{folder}: unreadable config.json ({str(e).splitlines()[0][:200]})") from None
    names = list(getattr(hf_cfg, "architectures", None) or [])
    if hf_cfg.model_type != "blip" or class_name not in names:
        raise InteropError(f"{folder}: {hf_cfg.model_type} {names or '(no architectures)'}, expected a {class_name} "
                           "folder")
    return hf_cfg, read_through_class(folder, blip_class(class_name), hf_cfg)


def _decoder_parts(folder: Path, section: dict, encoder: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """The decoder's own MED parts (causal self-attention, LM head) from a BlipForConditionalGeneration folder of
    the same sizes, and notes: shared parts that differ from the retrieval folder's (kept from the latter)."""
    dec_cfg, sd = read_blip_folder(folder, "BlipForConditionalGeneration")
    if model_section_from_blip_hf(dec_cfg, str(folder)) | {"embed_dim": 0} != section | {"embed_dim": 0}:
        raise InteropError(f"{folder}: its vision / text sizes differ from the retrieval folder's")
    decoder = blip_model_from_hf(sd, "blip_captioning")
    own = {k: v for k, v in decoder.items() if ".self_attn_dec." in k or k.startswith("text.lm_head.")}
    differ = [k for k, v in decoder.items() if k not in own and not torch.equal(encoder[k], v)]
    notes = [f"{len(differ)} shared tensors of {folder} differ from the retrieval folder's (kept the retrieval "
             "folder's: MED shares them between encoder and decoder)"] if differ else []
    return own, notes


def import_blip_hf(hf_dir: Path, out: Path, decoder: Optional[Path], log: Callable[[str], None]) -> dict:
    """BlipForImageTextRetrieval (+ optional BlipForConditionalGeneration for the decoder) -> model.arch=blip
    weights; the temperature comes from config.logit_scale_init_value (= ln(1/temp), as export_hf writes it).
    BlipForQuestionAnswering -> a VQA model's weights (model.objective=vqa: the question encoder and the answer
    decoder)."""
    import math

    class_name = "BlipForQuestionAnswering" if _is_vqa_folder(hf_dir) else "BlipForImageTextRetrieval"
    if class_name == "BlipForQuestionAnswering" and decoder is not None:
        raise InteropError(f"--decoder: {hf_dir} is a BlipForQuestionAnswering folder, which holds its own decoder")
    hf_cfg, sd = read_blip_folder(hf_dir, class_name)
    notes = [f"dropped a non-zero k bias in {len(ks)} vision layers (softmax-invariant)"
             for ks in [nonzero_k_bias(sd)] if ks]
    try:
        ours = blip_model_from_hf(sd, "blip_vqa" if class_name == "BlipForQuestionAnswering" else "blip_retrieval")
    except ValueError as e:
        raise InteropError(f"{hf_dir}: {e}") from None
    model = model_section_from_blip_hf(hf_cfg, str(hf_dir))
    if class_name == "BlipForQuestionAnswering":
        # A VQA model: the question encoder and its own answer decoder (model.objective=vqa); no ITC / ITM heads.
        model["objective"] = "vqa"
    elif decoder is not None:
        own, more = _decoder_parts(decoder, model, ours)
        ours.update(own)
        notes += more
    else:
        notes.append("no --decoder folder: the decoder self-attention and LM head are not in the weights "
                     "(model.init_from starts the decoder self-attention as a copy of the encoder's)")
    if class_name == "BlipForImageTextRetrieval":
        ours["temp"] = torch.tensor([math.exp(-hf_cfg.logit_scale_init_value)], dtype=torch.float32)
    log(f"{hf_dir}: {class_name}{' + ' + str(decoder) if decoder else ''} -> model.arch=blip")
    tokenizer = _load_tokenizer(hf_dir)
    if tokenizer is None:
        notes.append(f"no tokenizer in {hf_dir}: set model.text.tokenizer yourself")
    else:
        model["text"]["tokenizer"] = BLIP_TOKENIZER_DIR
    meta = {"arch": "blip", "contents": "trainable", "names": "blip_train", "paths_relative_to_folder": True,
            "source": {"hf": str(hf_dir.resolve()), "class": class_name,
                       "decoder": None if decoder is None else str(decoder.resolve())},
            "notes": notes, "config": {"model": model}}
    with replacing(out) as tmp:
        write_weights(ours, tmp, meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / BLIP_TOKENIZER_DIR))
        snippet = json.loads(json.dumps(model))
        if tokenizer is not None:
            snippet["text"]["tokenizer"] = str((out / BLIP_TOKENIZER_DIR).resolve())
        snippet["init_from"] = str(out.resolve())
        (tmp / SNIPPET).write_text(yaml.safe_dump({"model": snippet}, sort_keys=False))
    return {"arch": "blip", "class": class_name, "trained_tensors": len(ours), "notes": notes, "out": str(out)}


def _is_vqa_folder(folder: Path) -> bool:
    """Whether a BLIP folder's config.json names BlipForQuestionAnswering (read_blip_folder checks the rest)."""
    try:
        return "BlipForQuestionAnswering" in (json.loads((folder / "config.json").read_text()).get("architectures")
                                              or [])
    except (OSError, ValueError):
        return False
