"""Numerical parity with transformers' BLIP modules (fp32, eval, max abs diff <= 1e-5): the ViT with its final
norm against BlipVisionModel, and MED's three modes against BlipTextModel / BlipTextLMHeadModel.

Tiny random HF modules are built from config objects, perturbed so that every weight is distinct, copied into
ours through `hf_names`, and run on the same inputs (right-padded text included).
"""
from __future__ import annotations

import pytest
import torch

from blip_train.models.eva_vit import EVAViT
from blip_train.models.hf_names import blip_vision_from_hf, blip_vision_from_timm, blip_vision_to_hf
from blip_train.models.hf_names_blip import med_from_blip, med_from_hf, med_keys_without_hf, med_to_hf
from blip_train.models.med import MED
from tests.helpers.tiny import hf_blip_text_config, hf_blip_vision_config, tiny_text_config, tiny_vision_config
from tests.parity.test_parity_hf import image_inputs, load_exact, randomize_, text_inputs

pytestmark = pytest.mark.parity
BACKENDS = ["sdpa", "math"]
ATOL = 1e-5
B, NIMG, WIDTH = 2, 7, 24


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


def hf_text(cls_name: str, seed: int):
    """A perturbed BlipTextModel (no pooler, as BLIP's text_encoder) or BlipTextLMHeadModel (decoder tied to
    the word embeddings, as inside BlipForConditionalGeneration)."""
    import transformers

    torch.manual_seed(0)
    config = hf_blip_text_config(tiny_text_config(), WIDTH)
    if cls_name == "BlipTextModel":
        return randomize_(transformers.BlipTextModel(config, add_pooling_layer=False), seed=seed)
    hf = randomize_(transformers.BlipTextLMHeadModel(config), seed=seed)
    hf.cls.predictions.decoder.weight = hf.bert.embeddings.word_embeddings.weight
    return hf


def build_med(hf_sd: dict, view: str, backend: str) -> MED:
    med = MED(tiny_text_config(), encoder_width=WIDTH, attention=backend).eval()
    load_exact(med, med_from_hf(hf_sd, view), set(med_keys_without_hf(list(med.state_dict()), view)))
    return med


def image_embeds(seed: int = 7) -> torch.Tensor:
    """(B, Nimg, WIDTH). No image padding mask: transformers' BlipTextAttention (4.57) never passes
    `encoder_attention_mask` on to its cross-attention, so HF ignores one (BLIP's images are never padded);
    tests/unit/test_med.py checks ours."""
    return torch.randn(B, NIMG, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_med_encoder_modes_equal_blip_text_model(backend):
    hf = hf_text("BlipTextModel", seed=2)
    med = build_med(hf.state_dict(), "encoder", backend)
    (ids, am), image = text_inputs(), image_embeds()
    with torch.no_grad():
        want_text = hf(input_ids=ids, attention_mask=am, is_decoder=False).last_hidden_state
        ours_text = med(ids, am, mode="text")
        want = hf(input_ids=ids, attention_mask=am, encoder_hidden_states=image, is_decoder=False).last_hidden_state
        ours = med(ids, am, image_embeds=image, mode="multimodal")
    assert (ours_text - want_text).abs().max() <= ATOL
    assert (ours - want).abs().max() <= ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_med_decoder_logits_equal_blip_text_lm_head_model(backend):
    hf = hf_text("BlipTextLMHeadModel", seed=4)
    med = build_med(hf.state_dict(), "decoder", backend)
    (ids, am), image = text_inputs(), image_embeds()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=am, encoder_hidden_states=image, use_cache=False).logits
        ours = med.lm_logits(med(ids, am, image_embeds=image, mode="decoder"))
    assert ours.shape == (B, ids.size(1), tiny_text_config().vocab_size)
    assert (ours - want).abs().max() <= ATOL


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("view, cls_name", [("encoder", "BlipTextModel"), ("decoder", "BlipTextLMHeadModel")])
def test_med_names_round_trip(view, cls_name):
    hf_sd = hf_text(cls_name, seed=5).state_dict()
    ours = med_from_hf(hf_sd, view)
    assert_same_state(med_to_hf(ours, view), hf_sd)
    sd = MED(tiny_text_config(), encoder_width=WIDTH).state_dict()
    absent = set(med_keys_without_hf(list(sd), view))
    if view == "encoder":  # the decoder's self-attention and the LM head live in BlipTextLMHeadModel
        assert absent == {k for k in sd if ".self_attn_dec." in k or k.startswith("lm_head.")}
    else:  # the encoder's self-attention lives in BlipTextModel
        assert absent == {k for k in sd if ".self_attn." in k}
    back = med_from_hf(med_to_hf(sd, view), view)
    assert_same_state(back, {k: v for k, v in sd.items() if k not in absent})
    with pytest.raises(ValueError, match="bogus"):
        med_from_hf({"bogus.weight": torch.zeros(1)}, view)


def test_med_from_hf_refuses_an_untied_decoder():
    from transformers import BlipTextLMHeadModel

    hf = randomize_(BlipTextLMHeadModel(hf_blip_text_config(tiny_text_config(), WIDTH)), seed=6)  # untied
    with pytest.raises(ValueError, match="word embeddings"):
        med_from_hf(hf.state_dict(), "decoder")


def test_med_from_blip_checkpoint_layout():
    """BLIP's model_base.pth: text_encoder.* and text_decoder.* (tied except the self-attention), with the
    persistent position_ids buffer and the other parts of the model beside them."""
    enc, dec = hf_text("BlipTextModel", seed=8), hf_text("BlipTextLMHeadModel", seed=9)
    ckpt = {"visual_encoder.cls_token": torch.zeros(1, 1, 4), "itm_head.weight": torch.zeros(2, 32),
            "text_encoder.embeddings.position_ids": torch.arange(64)[None],
            "text_decoder.bert.embeddings.position_ids": torch.arange(64)[None]}
    ckpt.update({"text_encoder." + k: v for k, v in enc.state_dict().items()})
    ckpt.update({"text_decoder." + k: v for k, v in dec.state_dict().items()})
    assert_same_state(med_from_blip(ckpt, "text_encoder"), med_from_hf(enc.state_dict(), "encoder"))
    assert_same_state(med_from_blip(ckpt, "text_decoder"), med_from_hf(dec.state_dict(), "decoder"))
    with pytest.raises(ValueError, match="text_encoder_m"):
        med_from_blip(ckpt, "text_encoder_m")
