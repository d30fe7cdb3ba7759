"""Trained weights out of a run: consolidate the ZeRO shards of the trainable part, load them strictly.

Frozen towers are never taken from a checkpoint (checkpoints do not carry them): they are rebuilt from
their recorded source (the config's vision weights / LLM folder), exactly as at the start of training.
DeepSpeed's universal checkpoints skip frozen parameters too, so this is also the rule that keeps
elastic resume honest.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from blip_train.training.checkpoint import find_resume_tag, read_meta, require_whole_checkpoint


def resolve_checkpoint(path: str | Path, verify: bool = True) -> tuple[Path, str]:
    """Accept a run dir (its newest complete checkpoint), its checkpoints/ dir, or one tag dir; return
    (checkpoints dir, tag). verify: every file whole (CRC-checked), else CheckpointError naming the file."""
    p = Path(path)
    if (p / "complete.json").is_file():
        ckpt_dir, tag = p.parent, p.name
    else:
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        tag = find_resume_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"{path}: no complete checkpoint found (expected checkpoints/step_*/complete.json)")
    if verify:
        require_whole_checkpoint(ckpt_dir / tag)
    return ckpt_dir, tag


def consolidate_trainable(ckpt_dir: Path, tag: str, trainable_names: set[str]) -> dict[str, torch.Tensor]:
    """fp32 state dict of the trainable parameters, gathered from every rank's ZeRO shards (no process group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    read_meta(ckpt_dir / tag)  # refuses an incomplete checkpoint
    full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=True)
    missing = sorted(trainable_names - set(full))
    if missing:
        raise KeyError(f"{ckpt_dir / tag}: checkpoint lacks trainable parameters {missing[:5]} (wrong model or arch?)")
    return {k: full[k] for k in sorted(trainable_names)}


def load_trainable_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy trainable weights in place; every trainable parameter must be present, nothing else may be."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    unexpected = sorted(set(state) - trainable)
    missing = sorted(trainable - set(state))
    if unexpected or missing:
        raise KeyError(f"trainable weights mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))


# ------------------------------------------------------------------------------------ model.init_from

STAGE1_INIT_OPTIONAL = ("temp", "qformer.lm_head.")
"""Stage-1 parameters that a transformers retrieval model does not carry (imported with tools/import_hf.py):
when absent from init_from they keep their initial values (0.07; the LM head's transform from BERT/random)."""


def read_init_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights for `model.init_from`, in our names, from any of: a weights folder (tools/zero_to_safetensors.py,
    import_hf.py, import_lavis.py), a .safetensors / .pth file, or a run dir / checkpoints dir / step_* dir
    of ours (its trainable parameters merged from the ZeRO shards; frozen towers are never taken from it)."""
    from blip_train.interop.weights_io import is_weights_file, is_weights_folder, read_weights

    p = Path(path)
    if is_weights_folder(p) or is_weights_file(p):
        return read_weights(p)[0]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag = resolve_checkpoint(p)
    read_meta(ckpt_dir / tag)  # refuses an incomplete checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=True)


def init_stage1_from_(model: nn.Module, path: str | Path) -> list[str]:
    """Stage-1 `model.init_from`: the trainable weights of a ZeRO checkpoint of ours or of a weights folder /
    file; every trainable parameter must be there except STAGE1_INIT_OPTIONAL keys and, for a training ViT,
    the ViT (an earlier run with a frozen ViT does not carry it: it keeps the weights of model.vision.weights;
    one that trained it does, and they load). Frozen-tower tensors in it are ignored (towers come from their
    sources). Returns keys left at init."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    vit_trains = any(n.startswith("visual_encoder.") for n in params)
    from blip_train.interop.weights_io import is_weights_file, is_weights_folder

    state = read_init_weights(path)
    if not (is_weights_folder(path) or is_weights_file(path)):
        # A ZeRO checkpoint of ours: zero_to_fp32 also names tied aliases (the Q-Former LM head's decoder is
        # its word embedding); only the model's own parameter names are compared.
        state = {k: v for k, v in state.items() if k in params}
    if not vit_trains:
        state = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    optional = STAGE1_INIT_OPTIONAL + (("visual_encoder.",) if vit_trains else ())
    unexpected = sorted(set(state) - set(params))
    kept = sorted(set(params) - set(state))
    missing = [k for k in kept if not k.startswith(optional)]
    if unexpected or missing:
        raise KeyError(f"init_from {path}: missing trainable keys {missing[:5]}, unexpected keys {unexpected[:5]} "
                       "(a stage-1 model of another size or stage?)")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"init_from {path}: {name} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
    return kept


BLIP_INIT_OPTIONAL = ("temp", "text.lm_head.", "text.layers.{i}.self_attn_dec.")
"""BLIP / ALBEF parameters an imported retrieval model may lack (a transformers BlipForImageTextRetrieval without
its captioning decoder): the temperature keeps 0.07, the LM head its init, and the decoder self-attention starts
as a copy of the encoder's (MED.BERT_INIT_COPIES, as from BERT)."""


def _is_optional_blip(key: str) -> bool:
    return any(re.match(re.escape(p).replace(r"\{i\}", r"\d+"), key) for p in BLIP_INIT_OPTIONAL)


def _copy_decoder_self_attention_(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor],
                                  kept: list[str]) -> list[str]:
    """Fill missing `self_attn_dec` tensors from the loaded `self_attn` ones; returns the keys still at init."""
    still = []
    for name in kept:
        source = name.replace(".self_attn_dec.", ".self_attn.")
        if ".self_attn_dec." in name and source in state:
            params[name].copy_(state[source].to(params[name].dtype))
        else:
            still.append(name)
    return still


def _answer_decoder_from_med(params: dict[str, nn.Parameter],
                             state: dict[str, torch.Tensor]) -> tuple[list[str], set[str]]:
    """A VQA model's answer decoder (`text_decoder.*`) from a run without one (pretraining, captioning): each tensor
    starts as the MED's (`text.*`), the authors' start of VQA fine-tuning; added to `state` in place. Returns (the
    keys copied, the keys left at init because their shape differs: the cross-attention's keys and values when
    the ViT is wider than the MED, as ViT-L's 1024 against 768)."""
    if not any(k.startswith("text_decoder.") for k in params) or any(k.startswith("text_decoder.") for k in state):
        return [], set()
    copied, fresh = [], set()
    for name in params:
        source = "text." + name[len("text_decoder."):]
        if not name.startswith("text_decoder.") or source not in state:
            continue
        if state[source].shape == params[name].shape:
            state[name] = state[source]
            copied.append(name)
        else:
            fresh.add(name)
    return sorted(copied), fresh


def init_blip_from_(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """BLIP / ALBEF `model.init_from`: the trainable weights of a weights folder / file (tools/import_hf.py,
    import_lavis.py, zero_to_safetensors.py) or of a ZeRO checkpoint of ours, loaded strictly (only
    BLIP_INIT_OPTIONAL keys may be absent). The momentum copies and the feature queue load too when the file has
    them all (the authors' checkpoints do); otherwise the copies start as the loaded online weights (the queue
    keeps its random unit columns, replaced in the first steps). Returns {"kept": trainable keys left at init,
    "decoder_from_encoder": decoder self-attention copied from the encoder's, "answer_decoder": the VQA answer
    decoder's keys copied from the MED, "momentum": "loaded" | "copied", "queue": "loaded" | "initial"}."""
    from blip_train.interop.weights_io import is_weights_file, is_weights_folder

    from blip_train.models.eva_vit import interpolate_pos_embed

    everything = dict(model.named_parameters())
    momentum_ids = {id(m) for _, m in model.momentum_pairs()}
    copies = {n: p for n, p in everything.items() if id(p) in momentum_ids}
    # Online parameters, trained or frozen because the objective never reads them (those load too: a later run
    # with another objective, and export, find them as the earlier run left them).
    params = {n: p for n, p in everything.items() if id(p) not in momentum_ids}
    buffers = {n: b for n, b in model.named_buffers() if n.startswith("queue.") and b is not None}
    state = read_init_weights(path)
    if not (is_weights_folder(path) or is_weights_file(path)):
        state = {k: v for k, v in state.items() if k in params}  # zero_to_fp32 also names tied aliases
    state.pop("text.lm_head.decoder.weight", None)  # the word embeddings (tied), when a writer lists it
    if not copies:  # a captioning model has no momentum encoders or queue: the file's are not for it
        state = {k: v for k, v in state.items() if not k.startswith((*model.MOMENTUM.values(), "queue."))}
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):  # fine-tuning at 384 px from 224 px
        if key in state and key in everything and state[key].shape != everything[key].shape:
            state[key] = interpolate_pos_embed(state[key], model.visual_encoder.grid)
    answer_decoder, fresh = _answer_decoder_from_med(params, state)
    unexpected = sorted(set(state) - set(params) - set(copies) - set(buffers))
    kept = sorted(set(params) - set(state))
    missing = [k for k in kept if params[k].requires_grad and not _is_optional_blip(k) and k not in fresh]
    held_copies = [k for k in state if k in copies]
    if unexpected or missing or (held_copies and len(held_copies) != len(copies)):
        raise KeyError(f"init_from {path}: missing trainable keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
                       f"momentum copies {len(held_copies)} of {len(copies)} (a BLIP model of another size or arch?)")
    # The queue loads whole or not at all (another model.momentum.queue_size: it starts afresh).
    queue_loaded = bool(buffers) and all(k in state and state[k].shape == b.shape for k, b in buffers.items())
    if not queue_loaded:
        state = {k: v for k, v in state.items() if k not in buffers}
    targets = {**params, **copies, **buffers}
    for name, value in state.items():  # all checked before anything is overwritten
        if targets[name].shape != value.shape:
            raise ValueError(f"init_from {path}: {name} has shape {tuple(value.shape)}, the model "
                             f"{tuple(targets[name].shape)}")
    with torch.no_grad():
        for name, value in state.items():
            targets[name].copy_(value.to(targets[name].dtype))
        still = _copy_decoder_self_attention_(params, state, kept)
        if not held_copies:
            model.copy_to_momentum_()
    return {"kept": still, "decoder_from_encoder": sorted(set(kept) - set(still)), "answer_decoder": answer_decoder,
            "momentum": "loaded" if held_copies else "copied" if copies else "none",
            "queue": "loaded" if queue_loaded else "initial" if buffers else "none"}
