"""LAVIS checkpoints (BLIP-2 stage 1 / stage 2, InstructBLIP) and EVA ViT-g weights -> our names.

A LAVIS `.pth` becomes a weights folder (model.safetensors of the trained parts + metadata, and
vision.safetensors when the file holds the ViT), which `model.init_from` accepts. LAVIS saves the
frozen LLM under `opt_model.` / `t5_model.` / `llm_model.` at most; those tensors are left out (the
LLM comes from `model.llm.path`). It stores no model sizes that could be trusted to rebuild the
model (head counts are not in the shapes), so the folder carries no config: the recipe names it.

BLIP pretraining checkpoints (the authors' model_base*.pth / model_large*.pth, and LAVIS's BlipPretrain, which
uses the same names) become a model.arch=blip weights folder: the trained ViT stays in model.safetensors with
the MED, heads and temperature, and the momentum copies and feature queues come along (model.init_from loads
them instead of copying the online weights); see `hf_names_blip.blip_model_from_authors`. The authors' VQA
checkpoints (ViT, text_encoder and an untied text_decoder, no heads) become the weights of a model.objective=vqa
model (`hf_names_blip.blip_vqa_model_from_authors`). ALBEF's (ALBEF_4M.pth, ALBEF.pth: a BertForMaskedLM text
encoder) become a model.arch=albef folder with its momentum copies and queues (`albef_model_from_authors`).

EVA ViT-g (`eva_vit_g.pth` as LAVIS downloads it) already uses our names; the importer strips a
`visual.` / `visual_encoder.` prefix, drops heads that BLIP-2 never uses (`norm`, `fc_norm`, `head`)
and refuses EVA variants our tower does not implement (layer scale, relative position bias).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from blip_train.interop.weights_io import (InteropError, check_output, group_prefixes, parse_dtype, replacing,
                                           write_weights)
from blip_train.models.hf_names import model_from_lavis
from blip_train.models.hf_names_blip import (albef_model_from_authors, blip_model_from_authors,
                                             blip_vqa_model_from_authors, is_albef_checkpoint, is_blip_vqa_checkpoint)

VISION_FILE = "vision.safetensors"
ARCHS = ("stage1", "stage2", "instruct", "blip", "albef")
_REQUIRED = {"stage1": ("ln_vision.", "query_tokens", "qformer.", "vision_proj.", "text_proj.", "itm_head.", "temp"),
             "stage2": ("ln_vision.", "query_tokens", "qformer.", "llm_proj."),
             "instruct": ("ln_vision.", "query_tokens", "qformer.embeddings.word_embeddings.", "llm_proj.")}
_EVA_KEY = re.compile(r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|blocks\.\d+\.(norm1|norm2)\.(weight|bias)"
                      r"|blocks\.\d+\.attn\.(qkv\.weight|q_bias|v_bias|proj\.(weight|bias))"
                      r"|blocks\.\d+\.mlp\.fc[12]\.(weight|bias))")
_EVA_UNUSED = ("norm.", "fc_norm.", "head.")


def read_torch_state(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS / EVA `.pth` (unwrapping `model` / `state_dict` / `module`); tensors only."""
    p = Path(path)
    if not p.is_file():
        raise InteropError(f"{p}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects beyond tensors and plain containers
        raise InteropError(f"{p}: not a readable torch checkpoint ({str(e).splitlines()[0][:160]})") from None
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InteropError(f"{p}: not a state dict of tensors (nor a LAVIS checkpoint with a 'model' entry)")
    return obj


def detect_arch(ours: dict[str, torch.Tensor]) -> str:
    if "itm_head.weight" in ours or "vision_proj.weight" in ours:
        return "stage1"
    if any(k.startswith("llm_proj.") for k in ours):
        return "instruct" if "qformer.embeddings.word_embeddings.weight" in ours else "stage2"
    raise InteropError("cannot tell the stage (no ITM head / ITC projections, no LLM projection); pass --arch")


def import_lavis(path: Union[str, Path], out: Union[str, Path], *, arch: Optional[str] = None,
                 overwrite: bool = False, log: Callable[[str], None] = lambda s: None) -> dict:
    """LAVIS checkpoint -> weights folder of ours (see module doc). `arch` overrides the detected stage."""
    out = Path(out)
    check_output(out, overwrite)
    sd = read_torch_state(path)
    if arch is not None and arch not in ARCHS:
        raise InteropError(f"--arch {arch!r}: one of {', '.join(ARCHS)}")
    if arch == "albef" or (arch is None and is_albef_checkpoint(sd)):
        return import_blip_checkpoint(sd, path, out, log, arch="albef")
    if arch == "blip" or (arch is None and any(k.startswith("text_encoder.") for k in sd)):
        return import_blip_checkpoint(sd, path, out, log)
    try:
        ours, left_out = model_from_lavis(sd)
    except ValueError as e:
        raise InteropError(f"{path}: {e}") from None
    arch = arch or detect_arch(ours)
    missing = [r for r in _REQUIRED[arch] if not any(k.startswith(r) for k in ours)]
    if missing:
        raise InteropError(f"{path}: not a LAVIS {arch} checkpoint: nothing under {missing}")
    if arch != "stage1":  # stage-1 heads have no place in the LLM stages
        ours = {k: v for k, v in ours.items() if not k.startswith(("vision_proj.", "text_proj.", "itm_head.", "temp"))}
    vision = {k[len("visual_encoder."):]: v for k, v in ours.items() if k.startswith("visual_encoder.")}
    trained = {k: v for k, v in ours.items() if not k.startswith("visual_encoder.")}
    log(f"{path}: LAVIS {arch}: {len(trained)} trained tensors ({', '.join(group_prefixes(trained))}), "
        f"{len(vision)} ViT tensors, left out {len(left_out)} frozen-LLM tensors")
    meta = {"arch": arch, "contents": "trainable", "names": "blip_train", "config": None,
            "source": {"lavis": str(Path(path).resolve())}, "left_out": group_prefixes(left_out)}
    with replacing(out) as tmp:
        write_weights(trained, tmp, meta)
        if vision:
            write_weights(vision, tmp / VISION_FILE, {"contents": "vision", "names": "eva",
                                                      "source": meta["source"]})
    return {"arch": arch, "trained_tensors": len(trained), "vision_tensors": len(vision),
            "left_out": len(left_out), "out": str(out)}


BLIP_REQUIRED = ("visual_encoder.", "text.", "vision_proj.", "text_proj.", "itm_head.", "temp")


def import_blip_checkpoint(sd: dict[str, torch.Tensor], path: Union[str, Path], out: Path,
                           log: Callable[[str], None], arch: str = "blip") -> dict:
    """An authors' / LAVIS BLIP (or, arch="albef", ALBEF) pretraining state dict -> a model.arch=blip | albef
    weights folder (no config: the recipe names the sizes, as for LAVIS's BLIP-2 files)."""
    if arch == "blip" and is_blip_vqa_checkpoint(sd):
        return import_blip_vqa_checkpoint(sd, path, out, log)
    try:
        ours, differ = (albef_model_from_authors(sd), []) if arch == "albef" else blip_model_from_authors(sd)
    except ValueError as e:
        raise InteropError(f"{path}: {e}") from None
    missing = [r for r in BLIP_REQUIRED if not any(k.startswith(r) for k in ours)]
    if missing:
        raise InteropError(f"{path}: not a {arch.upper()} pretraining checkpoint: nothing under {missing}")
    momentum = [k for k in ours if k.split(".", 1)[0].endswith("_m")]
    queue = [k for k in ours if k.startswith("queue.")]
    notes = [f"{len(differ)} text_decoder tensors differ from text_encoder's (kept the encoder's: MED shares all "
             "but the self-attention; a fine-tuned, untied checkpoint?)"] if differ else []
    log(f"{path}: {arch.upper()} pretraining: {len(ours) - len(momentum) - len(queue)} trained tensors, {len(momentum)} "
        f"momentum, {len(queue)} queue; {'; '.join(notes) or 'decoder tied to the encoder'}")
    meta = {"arch": arch, "contents": "trainable+momentum" if momentum else "trainable", "names": "blip_train",
            "config": None, "source": {"blip": str(Path(path).resolve())}, "notes": notes}
    with replacing(out) as tmp:
        write_weights(ours, tmp, meta)
    return {"arch": arch, "trained_tensors": len(ours) - len(momentum) - len(queue),
            "momentum_tensors": len(momentum), "queue_tensors": len(queue), "notes": notes, "out": str(out)}


def import_blip_vqa_checkpoint(sd: dict[str, torch.Tensor], path: Union[str, Path], out: Path,
                               log: Callable[[str], None]) -> dict:
    """The authors' BLIP VQA state dict (ViT, text_encoder, untied text_decoder) -> the weights of a model.arch=blip,
    model.objective=vqa run (evaluate it, or fine-tune it further, with model.init_from)."""
    try:
        ours = blip_vqa_model_from_authors(sd)
    except ValueError as e:
        raise InteropError(f"{path}: {e}") from None
    log(f"{path}: BLIP VQA: {len(ours)} tensors (question encoder and answer decoder)")
    meta = {"arch": "blip", "objective": "vqa", "contents": "trainable", "names": "blip_train", "config": None,
            "source": {"blip": str(Path(path).resolve())}, "notes": []}
    with replacing(out) as tmp:
        write_weights(ours, tmp, meta)
    return {"arch": "blip", "objective": "vqa", "trained_tensors": len(ours), "momentum_tensors": 0,
            "queue_tensors": 0, "notes": [], "out": str(out)}


def eva_from_checkpoint(sd: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """EVA ViT tensors in EVAViT names, and the unused keys dropped."""
    for prefix in ("module.", "visual_encoder.", "visual."):
        if sd and all(k.startswith(prefix) for k in sd if not k.startswith(("text.", "logit_scale"))):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = [k for k in sd if k.startswith(_EVA_UNUSED)]
    kept = {k: v for k, v in sd.items() if not k.startswith(_EVA_UNUSED)}
    unknown = [k for k in kept if not _EVA_KEY.fullmatch(k)]
    if unknown:
        raise InteropError(f"{where}: not an EVA ViT our tower implements (unknown keys {unknown[:4]}; layer scale "
                           "and relative position bias are not supported)")
    if "pos_embed" not in kept or "blocks.0.attn.qkv.weight" not in kept:
        raise InteropError(f"{where}: no EVA ViT weights found (no pos_embed / blocks.0.attn.qkv.weight)")
    return kept, dropped


def import_eva_vit(path: Union[str, Path], out: Union[str, Path], *, dtype: Optional[str] = None,
                   overwrite: bool = False, log: Callable[[str], None] = lambda s: None) -> dict:
    """EVA ViT weights -> one `.safetensors` file for `model.vision.weights` (dtype kept unless given)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InteropError(f"--out {out}: the ViT is written as one .safetensors file")
    check_output(out, overwrite)
    vit, dropped = eva_from_checkpoint(read_torch_state(path), str(path))
    blocks = 1 + max(int(k.split(".")[1]) for k in vit if k.startswith("blocks."))
    width = vit["pos_embed"].shape[-1]
    log(f"{path}: EVA ViT with {blocks} blocks of width {width}; dropped {dropped or 'nothing'}")
    write_weights(vit, out, {"contents": "vision", "names": "eva", "source": {"eva": str(Path(path).resolve())},
                             "blocks": blocks, "width": int(width)}, dtype=parse_dtype(dtype), overwrite=overwrite)
    return {"blocks": blocks, "width": int(width), "tensors": len(vit), "dropped": dropped, "out": str(out)}
