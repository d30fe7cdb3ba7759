"""EVA ViT (ViT-g/14 in BLIP-2; the same code builds a CLIP ViT-L shape) and the fp32 `ln_vision`.

With `final_norm` it is also the timm ViT-B/16 / ViT-L/16 of BLIP and ALBEF: pre-norm blocks and a final
LayerNorm. timm's qkv has a full bias; its key third is softmax-invariant (see EVAAttention), so
dropping it on import (`hf_names.blip_vision_from_timm`) leaves the function unchanged.

State-dict names follow the EVA / LAVIS checkpoints (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.{i}.{norm1,attn.qkv,attn.q_bias,attn.v_bias,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so those
checkpoints load without renaming; `hf_names.py` maps to the transformers names.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip_train.config.schema import VisionConfig
from blip_train.distributed.zero import gathered
from blip_train.models.attention import attend, check_backend


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in float32 that returns float32 (BLIP-2's `ln_vision`).

    The frozen tower runs in fp16/bf16; normalising its output in fp32 avoids fp16 overflow of the
    variance, and the result stays fp32 because it feeds the trainable Q-Former, which casts it to
    its own compute dtype (fp32 under autocast, bf16 under DeepSpeed bf16). LAVIS casts back to the
    input dtype instead; returning fp32 keeps one extra rounding away from the trained path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels)  # (B, D, S/P, S/P)
        return x.flatten(2).transpose(1, 2)  # (B, (S/P)^2, D)


class EVAAttention(nn.Module):
    """Self-attention with one bias-free qkv projection plus q and v biases; the k bias is zero.

    A key bias adds q.b_k to every score of a query row, which softmax ignores, so EVA leaves it out.
    """

    def __init__(self, width: int, heads: int, attention: str):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # (3D,)
        # Call the submodule rather than reading its weight: under ZeRO-3 a weight is only gathered
        # inside its own module's forward.
        qkv = self.qkv(x) + bias  # (B, T, 3D)
        qkv = qkv.reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        out = attend(qkv[0], qkv[1], qkv[2], None, backend=self.attention)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as EVA


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of samples and scale the
    kept ones by 1 / (1 - p); the identity in eval mode or at p = 0.

    The mask is drawn from torch's global generator of the input's device, which the trainer seeds per rank
    and saves in every checkpoint, so a run and its resume draw the same masks.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # Drawn in fp32: bf16 uniforms are too coarse for a fair Bernoulli(keep).
        mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep  # (B, 1, 1)
        return x * (mask.to(x.dtype) / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(self, cfg: VisionConfig, attention: str, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = EVAAttention(cfg.width, cfg.heads, attention)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EVAViT(nn.Module):
    """Image (B, 3, S, S) -> tokens (B, 1 + (S/P)^2, width): [CLS; patches].

    Builds `cfg.layers - 1` blocks when `cfg.drop_last_block` (BLIP-2 reads the second-to-last
    block's output), else `cfg.layers`. `cfg.final_norm` adds the LayerNorm `norm` over all output
    tokens (timm / BLIP / ALBEF); BLIP-2 has none (its `ln_vision` lives outside the tower).
    """

    def __init__(self, cfg: VisionConfig, attention: str = "auto"):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"model.vision.width={cfg.width} is not divisible by model.vision.heads={cfg.heads}")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"model.vision.image_size={cfg.image_size} is not a multiple of "
                             f"model.vision.patch_size={cfg.patch_size}")
        check_backend(attention)
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // cfg.patch_size
        self.num_pretrained_blocks = cfg.layers
        self.grad_checkpointing = cfg.grad_checkpointing
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, cfg.width))
        depth = cfg.layers - 1 if cfg.drop_last_block else cfg.layers
        self.blocks = nn.ModuleList(Block(cfg, attention, drop_path_rates(cfg.drop_path_rate, depth)[i])
                                    for i in range(depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps) if cfg.final_norm else None
        self.reset_parameters()

    EMBEDDINGS = ("cls_token", "pos_embed", "patch_embed.")
    """Parameters below the first block (names relative to the tower)."""

    def layer_decay_scales(self, decay: float) -> dict[str, float]:
        """lr scale of every parameter (names relative to the tower) under layer-wise lr decay.

        Of L built blocks, block i (0-based) gets decay^(L - i), so the last block decays once and deeper
        layers more; the embeddings below block 0 get decay^(L + 1). The final norm sits above the last
        block and gets scale 1, as the head above the tower (ln_vision, Q-Former, MED), which is not part of it.
        """
        depth = len(self.blocks)
        scales = {}
        for name, _ in self.named_parameters():
            if name.startswith("blocks."):
                scales[name] = decay ** (depth - int(name.split(".")[1]))
            elif name.startswith(self.EMBEDDINGS):
                scales[name] = decay ** (depth + 1)
            elif name.startswith("norm."):
                scales[name] = 1.0
            else:
                raise ValueError(f"layer decay: no layer for ViT parameter {name}")
        return scales

    def reset_parameters(self) -> None:
        """EVA's init: truncated normal(0.02) for tokens and linear weights, zero biases, unit norms.

        Built under `deepspeed.zero.Init`, the blocks are already partitioned here: each block is gathered
        while it is initialised, so the weights and the random stream (which the Q-Former's init continues)
        are those of a whole build whether or not the tower is partitioned.
        """
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            with gathered(block, modifier_rank=0), torch.no_grad():
                for m in block.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.trunc_normal_(m.weight, std=0.02)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
                    elif isinstance(m, nn.LayerNorm):
                        nn.init.ones_(m.weight)
                        nn.init.zeros_(m.bias)
                    elif isinstance(m, EVAAttention):
                        nn.init.zeros_(m.q_bias)
                        nn.init.zeros_(m.v_bias)
        if self.norm is not None:
            with gathered(self.norm, modifier_rank=0), torch.no_grad():
                nn.init.ones_(self.norm.weight)
                nn.init.zeros_(self.norm.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(pixels.shape[-2:])}, the ViT was built for "
                             f"model.vision.image_size={self.image_size}")
        if not pixels.is_floating_point():
            raise TypeError(f"images are {pixels.dtype}, not normalised floats: training batches carry uint8 "
                            "pixels until blip_train.data.device.finish_batch normalises them on the device")
        dtype = self.patch_embed.proj.weight.dtype  # the frozen tower's precision decides
        x = self.patch_embed(pixels.to(dtype))  # (B, N, D)
        cls = self.cls_token.to(dtype).expand(x.size(0), -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(dtype)  # (B, 1 + N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if self.norm is None else self.norm(x)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop-path probabilities, rising linearly from 0 (first block) to `rate` (last), as EVA/BEiT."""
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize (1, 1 + g^2, D) position embeddings to a (grid x grid) patch grid, bicubically.

    The CLS position is kept as is; the patch positions are treated as a g x g image of D channels.
    """
    old = int(round((pos_embed.size(1) - 1) ** 0.5))
    if old * old != pos_embed.size(1) - 1:
        raise ValueError(f"pos_embed has {pos_embed.size(1) - 1} patch positions, not a square grid")
    if old == grid:
        return pos_embed
    d = pos_embed.size(-1)
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.float().reshape(1, old, old, d).permute(0, 3, 1, 2)  # (1, D, g, g)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)  # (1, grid^2, D)
    return torch.cat([cls_pos, patch_pos], dim=1)


def load_vit_weights_partitioned(model: EVAViT, path: Union[str, Path]) -> None:
    """`load_vit_weights` for a tower built under `deepspeed.zero.Init`: module by module, the parameters are
    gathered, rank 0 copies them from the file (read tensor by tensor, never whole), and leaving the gather
    re-partitions them from rank 0. No rank ever holds more than one block's tensors beyond its partition.
    A collective: every rank calls it."""
    import torch.distributed as dist

    sd = open_state_dict(path)
    kept = len(model.blocks)
    dropped = tuple(f"blocks.{i}." for i in range(kept, model.num_pretrained_blocks))
    names = {k for k in sd.keys() if not k.startswith(dropped)}
    expected = {n for n, _ in model.named_parameters()}
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: cannot load into EVAViT: missing keys {missing}, unexpected keys {unexpected}")
    for name, p in model.named_parameters():  # on every rank, before any gather a failure would leave hanging
        shape, want = tuple(sd.shape_of(name)), tuple(getattr(p, "ds_shape", p.shape))
        if shape != want and not (name == "pos_embed" and shape[::2] == want[::2]):
            raise ValueError(f"{path}: {name} has shape {shape}, the model {want}")
    writer = not dist.is_initialized() or dist.get_rank() == 0
    # One gather per block (and one for the embeddings) bounds what is live at once to a block.
    groups = [[(n, p) for n, p in model.named_parameters() if not n.startswith("blocks.")]]
    groups += [list(block.named_parameters(prefix=f"blocks.{i}")) for i, block in enumerate(model.blocks)]
    for params in groups:
        with gathered([p for _, p in params], modifier_rank=0), torch.no_grad():
            if writer:
                for name, p in params:
                    value = sd[name]
                    if name == "pos_embed":
                        value = interpolate_pos_embed(value, model.grid)
                    p.copy_(value)


class _LazyTensors(Mapping):
    """name → tensor, each read from the file when asked for (the names are known up front)."""

    def __init__(self, keys, read, shape_of=None):
        self._keys = list(keys)
        self._known = set(self._keys)
        self._read = read
        self._shape_of = shape_of or (lambda key: read(key).shape)

    def shape_of(self, key: str) -> torch.Size:
        """The tensor's shape without reading its data (where the format allows)."""
        if key not in self._known:
            raise KeyError(key)
        return torch.Size(self._shape_of(key))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __getitem__(self, key):
        if key not in self._known:
            raise KeyError(key)
        return self._read(key)


def open_state_dict(path: Union[str, Path]) -> "_LazyTensors":
    """`read_state_dict` without reading everything: safetensors through `safe_open`, a zip-format .pth
    memory-mapped (pages are read as tensors are copied). Old (non-zip) .pth files are read whole."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        handle = safe_open(str(path), framework="pt")
        return _LazyTensors(handle.keys(), handle.get_tensor, lambda key: handle.get_slice(key).get_shape())
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip archive: no mmap possible
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if set(sd) == {wrapper}:
            sd = sd[wrapper]
    return _LazyTensors(sd.keys(), sd.__getitem__)


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch .pth/.bin (unwrapping a lone 'model'/'state_dict')."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if set(sd) == {wrapper}:
            sd = sd[wrapper]
    return sd


TIMM_CLASSIFIER = ("head.", "head_dist.", "fc_norm.", "pre_logits.")
"""An ImageNet timm ViT/DeiT checkpoint's classification head: not part of the image encoder (BLIP / ALBEF start
from such checkpoints and drop it)."""


def from_timm_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict (full qkv bias: `blocks.N.attn.qkv.bias`) as EVAViT keys, its classifier head
    left out; any other state dict unchanged."""
    from blip_train.models.hf_names import blip_vision_from_timm

    if not any(k.endswith(".attn.qkv.bias") for k in sd):
        return sd
    return blip_vision_from_timm({k: v for k, v in sd.items() if not k.startswith(TIMM_CLASSIFIER)})


def load_vit_weights(model: EVAViT, path: Union[str, Path]) -> None:
    """Load EVA/our-named weights, or an ImageNet timm ViT/DeiT checkpoint (BLIP / ALBEF: classifier head left
    out, see `from_timm_layout`), strictly, interpolating position embeddings to the model's grid.

    Blocks the model dropped on purpose (`drop_last_block`) are skipped; any other missing or
    unexpected key is a ValueError that lists them.
    """
    sd = from_timm_layout(read_state_dict(path))
    kept = len(model.blocks)
    dropped = tuple(f"blocks.{i}." for i in range(kept, model.num_pretrained_blocks))
    sd = {k: v for k, v in sd.items() if not k.startswith(dropped)}
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], model.grid)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: cannot load into EVAViT: missing keys {missing}, unexpected keys {unexpected}")
    model.load_state_dict(sd, strict=True)
