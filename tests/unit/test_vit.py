"""EVAViT, LayerNormFP32, weight loading, freezing, and the vision name mapping."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from blip_train.models.eva_vit import EVAViT, LayerNormFP32, interpolate_pos_embed, load_vit_weights
from blip_train.models.freezing import count_parameters, freeze_, is_frozen
from blip_train.models.hf_names import fuse_qkv_bias, split_qkv_bias, vision_from_hf, vision_to_hf
from tests.helpers.tiny import tiny_vision_config


def build(seed: int = 0, **overrides) -> EVAViT:
    torch.manual_seed(seed)
    return EVAViT(tiny_vision_config(**overrides), attention="sdpa")


def images(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_shapes_and_block_count():
    vit = build()
    assert len(vit.blocks) == 2  # 3 pretrained blocks, the last one dropped
    assert vit(images()).shape == (2, 1 + 16, 32)
    assert len(build(drop_last_block=False).blocks) == 3
    with pytest.raises(ValueError, match="image_size"):
        vit(images(size=40))


def test_qkv_has_q_and_v_bias_only():
    attn = build().blocks[0].attn
    assert attn.qkv.bias is None and attn.q_bias.shape == attn.v_bias.shape == (32,)
    assert not any(n.endswith("k_bias") for n, _ in attn.named_parameters())


def test_final_norm():
    """BLIP/ALBEF's timm ViT: the same blocks, then a LayerNorm over all tokens, at lr scale 1 under layer decay."""
    plain, normed = build(), build(final_norm=True)
    assert plain.norm is None and "norm.weight" not in plain.state_dict()
    assert torch.equal(normed.norm.weight, torch.ones(32)) and torch.equal(normed.norm.bias, torch.zeros(32))
    assert normed.norm.eps == tiny_vision_config().layer_norm_eps
    with torch.no_grad():
        normed.norm.weight.normal_()
        normed.norm.bias.normal_()
    normed.load_state_dict({**plain.state_dict(), **{f"norm.{k}": v for k, v in normed.norm.state_dict().items()}})
    x = images()
    torch.testing.assert_close(normed(x), normed.norm(plain(x)), atol=0, rtol=0)
    scales = normed.layer_decay_scales(0.5)
    assert scales["norm.weight"] == scales["norm.bias"] == 1.0
    assert scales["blocks.1.mlp.fc1.weight"] == 0.5 and scales["cls_token"] == 0.125


def test_backends_agree():
    x = images()
    ref = build()(x)
    math_vit = build()
    for block in math_vit.blocks:
        block.attn.attention = "math"
    torch.testing.assert_close(math_vit(x), ref, atol=1e-5, rtol=0)


def test_gradient_checkpointing_matches():
    x = images()
    outs = []
    for ckpt in (False, True):
        vit = build(grad_checkpointing=ckpt).train()
        vit(x).square().mean().backward()
        outs.append([p.grad.clone() for p in vit.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_runs_in_bf16():
    vit = build().to(torch.bfloat16)
    out = vit(images())  # fp32 pixels are cast to the tower's dtype
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_layernorm_fp32_returns_fp32():
    ln = LayerNormFP32(32, eps=1e-6)
    nn.init.normal_(ln.weight)
    x = torch.randn(2, 5, 32).to(torch.bfloat16) * 100
    out = ln(x)
    assert out.dtype == torch.float32
    want = F.layer_norm(x.double(), (32,), ln.weight.double(), ln.bias.double(), 1e-6)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)


def test_interpolate_pos_embed():
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pos, 4) is pos
    out = interpolate_pos_embed(pos, 6)
    assert out.shape == (1, 1 + 36, 8) and torch.equal(out[:, :1], pos[:, :1])
    const = torch.ones(1, 1 + 16, 8)  # a constant field stays constant under bicubic resizing
    torch.testing.assert_close(interpolate_pos_embed(const, 7), torch.ones(1, 1 + 49, 8))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_load_weights_round_trip(tmp_path, fmt):
    src, dst = build(seed=0, drop_last_block=False), build(seed=1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}  # includes block 2, dropped by dst
    path = tmp_path / f"vit.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save({"model": sd}, path)
    load_vit_weights(dst, path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_weights_interpolates_and_is_strict(tmp_path):
    big = build(image_size=48)  # 6x6 grid
    path = tmp_path / "vit.safetensors"
    save_file(big.state_dict(), str(path))
    small = build(seed=1)
    load_vit_weights(small, path)
    torch.testing.assert_close(small.pos_embed, interpolate_pos_embed(big.pos_embed.detach(), 4))
    sd = dict(big.state_dict())
    sd["head.weight"] = torch.zeros(1)
    del sd["blocks.0.attn.q_bias"]
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.q_bias'\], unexpected keys \['head.weight'\]"):
        load_vit_weights(small, path)


def test_vision_names_round_trip():
    vit = build()
    sd = dict(vit.state_dict())
    sd.update({"ln_vision.weight": torch.ones(32), "ln_vision.bias": torch.zeros(32)})
    hf = vision_to_hf(sd)
    assert "post_layernorm.weight" in hf and "encoder.layers.1.self_attn.qkv.bias" in hf
    back = vision_from_hf(hf)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert vision_to_hf(back).keys() == hf.keys()
    q, v = torch.randn(4), torch.randn(4)
    fused = fuse_qkv_bias(q, v)
    assert torch.equal(fused[4:8], torch.zeros(4))
    assert all(torch.equal(a, b) for a, b in zip(split_qkv_bias(fused), (q, v)))
    with pytest.raises(ValueError, match="head.weight"):
        vision_to_hf({"head.weight": torch.zeros(1)})


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.head = nn.Linear(4, 2)


def test_freeze_survives_train():
    model = Parent()
    freeze_(model.tower)
    model.train()
    assert model.training and model.head.training
    assert not model.tower.training and not any(m.training for m in model.tower.modules())
    model.tower[1].train()  # even a direct call on a submodule keeps it in eval
    assert not model.tower[1].training
    x = torch.ones(3, 4)
    assert torch.equal(model.tower(x), model.tower(x))  # dropout inactive
    assert is_frozen(model.tower) and not is_frozen(model.head)
    assert all(not p.requires_grad for p in model.tower.parameters())
    assert count_parameters(model) == (4 * 2 + 2, 4 * 4 + 4)
    clone = copy.deepcopy(model).train()  # the engine may copy the model: the copy stays frozen too
    assert not clone.tower.training and is_frozen(clone.tower)
