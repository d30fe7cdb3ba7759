"""A training ViT (model.vision.frozen=false): layer-wise lr decay groups, stochastic depth, activation
checkpointing with it, and position-embedding interpolation of loaded weights."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from blip_train.config import load_config
from blip_train.models.eva_vit import DropPath, EVAViT, load_vit_weights
from blip_train.models.stage1 import Blip2Stage1, build_vision_tower
from blip_train.training.engine import apply_lr_, build_param_groups
from tests.helpers.tiny import tiny_model_config, tiny_vision_config


def _trainable_stage1(**vision) -> Blip2Stage1:
    torch.manual_seed(0)
    cfg = tiny_model_config(vision=tiny_vision_config(frozen=False, layers=5, **vision))  # 4 blocks built
    return Blip2Stage1(cfg, device_type="cpu")


def _expected_scale(name: str, decay: float, depth: int) -> float:
    """The formula, written out independently of the implementation."""
    m = re.match(r"visual_encoder\.blocks\.(\d+)\.", name)
    if m:
        return decay ** (depth - int(m.group(1)))
    if name in ("visual_encoder.cls_token", "visual_encoder.pos_embed") or name.startswith("visual_encoder.patch_embed."):
        return decay ** (depth + 1)
    assert not name.startswith("visual_encoder."), name
    return 1.0


def test_layer_decay_scales_follow_the_formula():
    model = _trainable_stage1()
    depth = len(model.visual_encoder.blocks)
    assert depth == 4
    decay = 0.75
    groups = build_param_groups(model, 0.05, decay)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.append(name)
            assert g["lr_scale"] == _expected_scale(name, decay, depth), name  # exact, not approximately
            no_decay = p.ndim < 2 or name.endswith(".bias") or "query_tokens" in name or name.endswith("temp")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.startswith("visual_encoder.blocks.") for n in seen)
    # Every (scale, decay?) pair has its own group: 4 blocks + embeddings + rest, each split in two.
    assert len({(g["lr_scale"], g["weight_decay"]) for g in groups}) == len(groups) == 12
    opt = torch.optim.AdamW(groups, lr=1.0)
    cfg = load_config(None, ["optim.lr=2e-4", "optim.warmup_steps=0"])
    lr = apply_lr_(opt, 0, cfg)
    for g in opt.param_groups:
        assert g["lr"] == lr * g["lr_scale"]


def test_no_layer_decay_keeps_two_groups_at_scale_one():
    groups = build_param_groups(_trainable_stage1(), 0.05, 1.0)
    assert [(g["name"], g["lr_scale"]) for g in groups] == [("decay", 1.0), ("no_decay", 1.0)]


def test_trainable_tower_is_fp32_and_trains():
    cfg = tiny_model_config(vision=tiny_vision_config(frozen=False, precision="fp16"))
    vit = build_vision_tower(cfg, "cuda")  # a frozen one would be fp16 here; a training one keeps fp32 masters
    assert all(p.dtype == torch.float32 and p.requires_grad for p in vit.parameters())
    vit.train()
    assert vit.training and all(m.training for m in vit.modules())


def test_drop_path_rates_rise_linearly():
    vit = EVAViT(tiny_vision_config(frozen=False, layers=5, drop_path_rate=0.3))
    assert [b.drop_path.p for b in vit.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def _vit_pair(rate: float):
    torch.manual_seed(0)
    plain = EVAViT(tiny_vision_config(frozen=False, layers=5))
    dropping = EVAViT(tiny_vision_config(frozen=False, layers=5, drop_path_rate=rate))
    dropping.load_state_dict(plain.state_dict())
    return plain, dropping


def test_drop_path_is_identity_in_eval():
    plain, dropping = _vit_pair(0.5)
    x = torch.randn(6, 3, 32, 32)
    plain.eval(), dropping.eval()
    torch.manual_seed(1)
    assert torch.equal(dropping(x), plain(x))


def test_drop_path_in_training_is_seeded_and_drops_per_sample():
    plain, dropping = _vit_pair(0.5)
    plain.train(), dropping.train()
    x = torch.randn(16, 3, 32, 32)
    torch.manual_seed(1)
    a = dropping(x)
    torch.manual_seed(1)
    b = dropping(x)
    torch.manual_seed(2)
    c = dropping(x)
    assert torch.equal(a, b)  # the same seed draws the same masks
    assert not torch.equal(a, c)
    assert not torch.allclose(a, plain(x))
    drop = DropPath(0.25).train()
    torch.manual_seed(0)
    out = drop(torch.ones(64, 5, 3))  # (B, T, D): one decision per sample
    kept = out[:, 0, 0] != 0
    assert torch.equal(out, kept.view(-1, 1, 1).float().expand_as(out) / 0.75)
    assert 0 < int((~kept).sum()) < 64


def test_grad_checkpointing_with_drop_path_gives_the_same_gradients():
    torch.manual_seed(0)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        vit = EVAViT(tiny_vision_config(frozen=False, layers=5, drop_path_rate=0.4, grad_checkpointing=ckpt))
        vit.train()
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(7)
        vit(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in vit.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        # Recomputation replays the same drop-path masks (the RNG state is restored for it).
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_trainable_tower_loads_weights_of_another_resolution(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = EVAViT(tiny_vision_config())  # 32 px, 8 px patches: a 4 x 4 grid
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    cfg = tiny_model_config(vision=tiny_vision_config(frozen=False, image_size=48, weights=str(tmp_path / "vit.safetensors")))
    vit = build_vision_tower(cfg, "cpu")  # 48 px: a 6 x 6 grid
    load_vit_weights(vit, cfg.vision.weights)
    pos = vit.pos_embed.detach()
    assert pos.shape == (1, 1 + 36, 32)
    assert torch.equal(pos[:, :1], src.pos_embed[:, :1])  # the CLS position is kept
    grid = src.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    torch.testing.assert_close(pos[:, 1:], expected)
    vit.train()
    vit(torch.randn(2, 3, 48, 48)).mean().backward()
    assert vit.pos_embed.requires_grad and vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0


def test_training_tower_gets_gradients_through_stage1_image_embeddings():
    frozen, training = Blip2Stage1(tiny_model_config(), device_type="cpu"), _trainable_stage1()
    for model in (frozen, training):
        model.train()
        model.image_embeddings(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in frozen.visual_encoder.parameters())  # no graph through a frozen tower
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in training.visual_encoder.parameters())
