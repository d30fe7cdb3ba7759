"""The frozen 3D tower of model.modality=3d: a Point-BERT point-cloud transformer, as ULIP-2 trains it.

X-InstructBLIP reads point clouds with ULIP-2's Point-BERT: the cloud is cut into local patches (centres by
farthest point sampling, each centre's k nearest points, in coordinates relative to it), a small PointNet turns
each patch into a token, a learned MLP of the centre's coordinates is its position, and a transformer (with the
position added again before every block) reads [cls; patch tokens]. Its token states (B, 1 + groups, width) go
to the modality's Q-Former, as the ViT's do.

Parameters carry the names of ULIP-2's checkpoints (`encoder.first_conv.*`, `reduce_dim`, `cls_token`, `cls_pos`,
`pos_embed.*`, `blocks.blocks.N.*`, `norm`), so an import only strips its prefixes (tools/import_ulip2_pointbert.py).
A tower folder holds `config.json` (PointBertShape's fields) and `model.safetensors`.

The tower is small (22M parameters at ULIP-2's size): it is built whole, in the LLM's dtype, and ZeRO-3
partitions it with the rest of the model when the engine is built. Sampling and neighbour search run in fp32.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Union

import torch
from torch import nn

from blip_train.models.freezing import freeze_

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class PointBertShape:
    """A Point-BERT tower's dimensions (defaults: ULIP-2's, as X-InstructBLIP loads it)."""
    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    group_size: int = 32
    """Points per patch (the centre's k nearest neighbours)."""
    num_group: int = 512
    """Patches (tokens) per cloud, centres picked by farthest point sampling."""
    encoder_dims: int = 256
    """Width of the patch PointNet's output, before reduce_dim."""
    in_channels: int = 3
    """3: xyz; 6: xyz + rgb (the rgb of a patch's points is given as is, the xyz relative to its centre)."""
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "PointBertShape":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise ValueError(f"{source}: unknown Point-BERT config keys {unknown} (known: {sorted(known)})")
        return cls(**{k: v for k, v in d.items() if k in known})


def farthest_points(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, 3) → (B, n) indices chosen greedily, each the farthest from those chosen so far, starting from
    each cloud's first point (deterministic). On a cloud stored by farthest point sampling (data/points.py),
    these are its first n points."""
    b, count, _ = xyz.shape
    if n > count:
        raise ValueError(f"{n} patch centres asked of a cloud of {count} points")
    chosen = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, count), float("inf"), device=xyz.device)
    last = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(n):
        chosen[:, i] = last
        dist = torch.minimum(dist, ((xyz - xyz[rows, last][:, None]) ** 2).sum(-1))
        last = dist.argmax(-1)
    return chosen


def group_points(points: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, C) cloud → patches (B, G, k, C), xyz relative to the patch centre (other channels as given), and
    the centres (B, G, 3). In fp32 whatever the input's dtype: distances decide which points are neighbours."""
    pts = points.float()
    xyz = pts[..., :3]
    rows = torch.arange(pts.shape[0], device=pts.device)[:, None]
    centres = xyz[rows, farthest_points(xyz, num_group)]  # (B, G, 3)
    near = torch.cdist(centres, xyz).topk(group_size, dim=-1, largest=False).indices  # (B, G, k), nearest first
    patches = pts[rows[:, :, None], near]  # (B, G, k, C)
    patches = torch.cat([patches[..., :3] - centres[:, :, None], patches[..., 3:]], dim=-1)
    return patches, centres


class PatchEncoder(nn.Module):
    """Point-BERT's mini-PointNet: per-point features, the patch's max-pooled feature put back beside each point,
    a second per-point MLP, max-pooled again: one token per patch."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(in_channels, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, out_channels, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, g, k, c = patches.shape
        x = self.first_conv(patches.reshape(b * g, k, c).transpose(1, 2))  # (BG, 256, k)
        pooled = x.max(dim=2, keepdim=True).values
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, k), x], dim=1))
        return x.max(dim=2).values.reshape(b, g, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, s: PointBertShape) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(s.trans_dim, eps=s.layer_norm_eps)
        self.attn = Attention(s.trans_dim, s.num_heads, s.qkv_bias)
        self.norm2 = nn.LayerNorm(s.trans_dim, eps=s.layer_norm_eps)
        self.mlp = Mlp(s.trans_dim, int(s.trans_dim * s.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    """The block list under `blocks.blocks` (the checkpoints' nesting); the position is added before each."""

    def __init__(self, s: PointBertShape) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointEncoder(nn.Module):
    """(B, N, C) normalised point clouds → token states (B, 1 + num_group, trans_dim), the class token first
    (as the ViT's)."""

    def __init__(self, shape: PointBertShape) -> None:
        super().__init__()
        self.shape = shape
        self.width = shape.trans_dim
        self.layer_norm_eps = shape.layer_norm_eps
        self.encoder = PatchEncoder(shape.in_channels, shape.encoder_dims)
        self.reduce_dim = nn.Linear(shape.encoder_dims, shape.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, shape.trans_dim) * 0.02)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, shape.trans_dim))
        self.blocks = Blocks(shape)
        self.norm = nn.LayerNorm(shape.trans_dim, eps=shape.layer_norm_eps)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        s = self.shape
        if points.dim() != 3 or points.shape[-1] != s.in_channels:
            raise ValueError(f"point clouds of shape {tuple(points.shape)}; this encoder takes (batch, points, "
                             f"{s.in_channels}) ({'xyz + rgb' if s.in_channels == 6 else 'xyz'}: its in_channels)")
        if points.shape[1] < s.group_size:
            raise ValueError(f"clouds of {points.shape[1]} points; a patch takes {s.group_size}")
        dtype = self.reduce_dim.weight.dtype
        patches, centres = group_points(points, min(s.num_group, points.shape[1]), s.group_size)
        tokens = self.reduce_dim(self.encoder(patches.to(dtype)))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(centres.to(dtype))], dim=1)
        return self.norm(self.blocks(x, pos))


def save_point_encoder(encoder: PointEncoder, folder: Union[str, Path]) -> Path:
    """Write a tower folder (config.json + model.safetensors) that `load_point_encoder` reads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps({"model_type": "point_bert", **asdict(encoder.shape)}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, str(folder / WEIGHTS_NAME))
    return folder


def read_point_bert_shape(folder: Union[str, Path]) -> PointBertShape:
    """The dimensions in a tower folder's config.json; ValueError naming the file when it is missing or wrong."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: missing; a Point-BERT folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                         "(tools/import_ulip2_pointbert.py writes one from a ULIP-2 checkpoint)")
    try:
        return PointBertShape.from_dict(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def load_point_encoder(folder: Union[str, Path], dtype: torch.dtype = torch.float32) -> PointEncoder:
    """The frozen tower of a folder written by `save_point_encoder` (or tools/import_ulip2_pointbert.py), in
    `dtype` (BatchNorm's running statistics too), in eval mode. ValueError naming the file on a mismatch."""
    from safetensors.torch import load_file

    weights = Path(folder) / WEIGHTS_NAME
    shape = read_point_bert_shape(folder)
    if not weights.is_file():
        raise ValueError(f"{weights}: missing; a Point-BERT folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                         "(tools/import_ulip2_pointbert.py writes one from a ULIP-2 checkpoint)")
    cfg_path = Path(folder) / CONFIG_NAME
    encoder = PointEncoder(shape)
    state = load_file(str(weights))
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise ValueError(f"{weights}: not a Point-BERT of {cfg_path.name}'s shape: {str(e).splitlines()[-1].strip()}"
                         ) from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{weights}: not a Point-BERT of {cfg_path.name}'s shape: missing {sorted(missing)[:6]}, "
                         f"unexpected {sorted(unexpected)[:6]}")
    return freeze_(encoder.to(dtype))
