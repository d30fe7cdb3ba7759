"""ULIP-2's Point-BERT → a point-cloud tower folder (model.points.encoder).

ULIP-2 saves its whole model (the point encoder, its projection into CLIP's space, and sometimes the image and
text towers) as a torch checkpoint: {"state_dict": {"module.point_encoder.<name>": ...}} after DDP, without
"module." otherwise. The encoder's names are ours (models/point_encoder.py), so importing keeps the tensors under
point_encoder., drops its classification head if present, and reads the dimensions the tensors fix (width, depth,
patch PointNet width, input channels) from their shapes. The head count and the patch sizes are not in any shape:
they come from the caller (ULIP-2's Point-BERT: 6 heads, 512 patches of 32 points).
"""
from __future__ import annotations

import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Union

import torch

from blip_train.interop.lavis import read_torch_state
from blip_train.interop.weights_io import InteropError, check_output, temp_path
from blip_train.models.point_encoder import PointBertShape, PointEncoder, save_point_encoder

_PREFIXES = ("module.point_encoder.", "point_encoder.", "module.")
_HEADS = ("cls_head_finetune.", "cls_head.")  # Point-BERT's classification heads: not part of the tower


def point_bert_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a ULIP-2 (or bare Point-BERT) state dict, in the tower's names."""
    for prefix in _PREFIXES:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if "reduce_dim.weight" in found:
            return {k: v for k, v in found.items() if not k.startswith(_HEADS)}
    return {k: v for k, v in state.items() if not k.startswith(_HEADS)} if "reduce_dim.weight" in state else {}


def shape_from_tensors(t: dict[str, torch.Tensor], num_heads: int, group_size: int, num_group: int
                       ) -> PointBertShape:
    depth = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"blocks\.blocks\.(\d+)\.", k)))
    width = t["cls_token"].shape[-1]
    return PointBertShape(trans_dim=width, depth=depth, num_heads=num_heads, group_size=group_size,
                          num_group=num_group, encoder_dims=t["reduce_dim.weight"].shape[1],
                          in_channels=t["encoder.first_conv.0.weight"].shape[1],
                          mlp_ratio=t["blocks.blocks.0.mlp.fc1.weight"].shape[0] / width,
                          qkv_bias="blocks.blocks.0.attn.qkv.bias" in t)


def import_ulip2_pointbert(path: Union[str, Path], out: Union[str, Path], *, num_heads: int = 6,
                           group_size: int = 32, num_group: int = 512, overwrite: bool = False,
                           log: Callable[[str], None] = lambda s: None) -> dict:
    """Checkpoint → tower folder (config.json + model.safetensors); returns its shape and tensor count."""
    out = Path(out)
    check_output(out, overwrite)
    tensors = point_bert_tensors(read_torch_state(path))
    if not tensors:
        raise InteropError(f"{path}: no Point-BERT tensors (no reduce_dim.weight under module.point_encoder., "
                           "point_encoder. or at the top level)")
    shape = shape_from_tensors(tensors, num_heads, group_size, num_group)
    if shape.trans_dim % num_heads:
        raise InteropError(f"--num-heads {num_heads} does not divide the width {shape.trans_dim}")
    encoder = PointEncoder(shape)
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise InteropError(f"{path}: its point encoder is not Point-BERT's layout ({detail})") from None
    log(f"Point-BERT: width {shape.trans_dim}, {shape.depth} blocks, {shape.in_channels} input channels, "
        f"{sum(p.numel() for p in encoder.parameters()):,d} parameters")
    tmp = temp_path(out)
    save_point_encoder(encoder, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"out": str(out), "tensors": len(tensors), **asdict(shape)}
