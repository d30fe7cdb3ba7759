"""Numerical parity with transformers' BLIP modules (fp32, eval, max abs diff <= 1e-5): the ViT with its final
norm against BlipVisionModel.

Tiny random HF modules are built from config objects, perturbed so that every weight is distinct, copied into
ours through `hf_names`, and run on the same inputs.
"""
from __future__ import annotations

import pytest
import torch

from blip_train.models.eva_vit import EVAViT
from blip_train.models.hf_names import blip_vision_from_hf, blip_vision_from_timm, blip_vision_to_hf
from tests.helpers.tiny import hf_blip_vision_config, tiny_vision_config
from tests.parity.test_parity_hf import image_inputs, load_exact, randomize_

pytestmark = pytest.mark.parity
BACKENDS = ["sdpa", "math"]
ATOL = 1e-5


def blip_vision_config():
    """The tiny ViT as BLIP builds it: every block kept, a final norm."""
    return tiny_vision_config(drop_last_block=False, final_norm=True)


def hf_vision(seed: int = 1):
    from transformers import BlipVisionModel

    torch.manual_seed(0)
    return randomize_(BlipVisionModel(hf_blip_vision_config(blip_vision_config())), seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_tower_equals_blip_vision_model(backend):
    hf = hf_vision()  # its k bias is non-zero: softmax ignores it
    vit = EVAViT(blip_vision_config(), attention=backend).eval()
    load_exact(vit, blip_vision_from_hf(hf.state_dict()))
    x = image_inputs(blip_vision_config())
    with torch.no_grad():
        want, ours = hf(pixel_values=x).last_hidden_state, vit(x)
    assert (ours - want).abs().max() <= ATOL


def test_vision_names_round_trip():
    vit = EVAViT(blip_vision_config())
    sd = vit.state_dict()
    hf = blip_vision_to_hf(sd)
    assert "post_layernorm.weight" in hf and "encoder.layers.2.self_attn.qkv.bias" in hf
    back = blip_vision_from_hf(hf)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def timm_layout(hf_sd: dict) -> dict:
    """The authors' (timm) names of a BlipVisionModel's tensors, written out here independently of hf_names."""
    out = {"cls_token": hf_sd["embeddings.class_embedding"], "pos_embed": hf_sd["embeddings.position_embedding"],
           "norm.weight": hf_sd["post_layernorm.weight"], "norm.bias": hf_sd["post_layernorm.bias"]}
    for p in ("weight", "bias"):
        out[f"patch_embed.proj.{p}"] = hf_sd[f"embeddings.patch_embedding.{p}"]
        for i in range(blip_vision_config().layers):
            layer = f"encoder.layers.{i}."
            for ours, theirs in (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"),
                                 ("attn.proj", "self_attn.projection"), ("norm2", "layer_norm2"),
                                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"blocks.{i}.{ours}.{p}"] = hf_sd[f"{layer}{theirs}.{p}"]
    return out


def test_timm_layout_import_drops_the_k_bias_without_changing_outputs():
    hf = hf_vision(seed=3)
    timm = timm_layout(hf.state_dict())
    k_bias = timm["blocks.0.attn.qkv.bias"].chunk(3)[1]
    assert k_bias.abs().min() > 0  # a real key bias, which the import drops
    vit = EVAViT(blip_vision_config(), attention="math").eval()
    load_exact(vit, blip_vision_from_timm(timm))
    x = image_inputs(blip_vision_config(), seed=6)
    with torch.no_grad():
        want, ours = hf(pixel_values=x).last_hidden_state, vit(x)
    assert (ours - want).abs().max() <= ATOL
    with pytest.raises(ValueError, match="head.weight"):
        blip_vision_from_timm({**timm, "head.weight": torch.zeros(1)})
