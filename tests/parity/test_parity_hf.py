"""Numerical parity with transformers' BLIP-2 / InstructBLIP modules (fp32, eval, max abs diff <= 1e-5).

Tiny random HF modules are built from config objects, perturbed so that every weight (LayerNorms
included) is distinct, copied into ours through `hf_names`, and run on the same inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip_train.models.eva_vit import EVAViT, LayerNormFP32
from blip_train.models.hf_names import (model_from_hf, model_to_hf, qformer_from_hf, qformer_keys_without_hf,
                                        vision_from_hf)
from blip_train.models.qformer import QFormer
from tests.helpers.tiny import (hf_blip2_config, hf_instructblip_qformer_config, hf_qformer_config,
                                hf_vision_config, tiny_qformer_config, tiny_vision_config)

pytestmark = pytest.mark.parity
BACKENDS = ["sdpa", "math"]
ATOL = 1e-5
B, T = 2, 6


def randomize_(model: nn.Module, seed: int, zero_k_bias: bool = False) -> nn.Module:
    """Perturb every parameter so a swapped name cannot go unnoticed; optionally zero HF's k bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            if zero_k_bias and name.endswith("qkv.bias"):
                p[p.numel() // 3: 2 * p.numel() // 3] = 0
    return model.eval()


def load_exact(module: nn.Module, sd: dict, allowed_missing: set[str] = frozenset()) -> None:
    result = module.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == set(allowed_missing) and not result.unexpected_keys, result


def text_inputs(seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (B, T), generator=g)
    return ids, torch.tensor([[1] * T, [1] * 4 + [0] * (T - 4)])


def image_inputs(cfg, seed: int = 5):
    return torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def build_vision(hf_sd: dict, backend: str) -> tuple[EVAViT, LayerNormFP32]:
    cfg = tiny_vision_config()
    ours = vision_from_hf(hf_sd)
    vit, ln = EVAViT(cfg, attention=backend).eval(), LayerNormFP32(cfg.width, eps=cfg.layer_norm_eps)
    load_exact(vit, {k: v for k, v in ours.items() if not k.startswith("ln_vision.")})
    load_exact(ln, {k[len("ln_vision."):]: v for k, v in ours.items() if k.startswith("ln_vision.")})
    return vit, ln


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_tower(backend):
    from transformers import Blip2VisionModel

    cfg = tiny_vision_config()
    torch.manual_seed(0)
    hf = randomize_(Blip2VisionModel(hf_vision_config(cfg)), seed=1)  # k bias non-zero: softmax ignores it
    vit, ln = build_vision(hf.state_dict(), backend)
    x = image_inputs(cfg)
    with torch.no_grad():
        want_blocks = hf.encoder(inputs_embeds=hf.embeddings(x)).last_hidden_state
        want = hf(pixel_values=x).last_hidden_state
        ours = vit(x)
    assert (ours - want_blocks).abs().max() <= ATOL
    assert (ln(ours) - want).abs().max() <= ATOL


def build_qformer(hf_sd: dict, layout: str, backend: str, width: int) -> QFormer:
    qf = QFormer(tiny_qformer_config(), encoder_width=width, attention=backend).eval()
    absent = set(qformer_keys_without_hf(list(qf.state_dict()), layout))
    load_exact(qf, qformer_from_hf(hf_sd, layout), absent)
    return qf


@pytest.mark.parametrize("backend", BACKENDS)
def test_qformer_query_path(backend):
    from transformers import Blip2QFormerModel

    qcfg, width = tiny_qformer_config(), 24
    torch.manual_seed(0)
    hf = randomize_(Blip2QFormerModel(hf_qformer_config(qcfg, width)), seed=2)
    qf = build_qformer(hf.state_dict(), "blip2_qformer", backend, width)
    g = torch.Generator().manual_seed(3)
    queries, image = torch.randn(B, 4, 32, generator=g), torch.randn(B, 7, width, generator=g)
    image_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    for mask in (None, image_mask):
        with torch.no_grad():
            want = hf(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask).last_hidden_state
            ours = qf(query_embeds=queries, image_embeds=image, image_mask=mask).last_hidden_state
        assert (ours - want).abs().max() <= ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_instructblip_qformer_text_paths(backend):
    from transformers import InstructBlipQFormerModel

    qcfg, width = tiny_qformer_config(), 24
    torch.manual_seed(0)
    hf = randomize_(InstructBlipQFormerModel(hf_instructblip_qformer_config(qcfg, width)), seed=6)
    qf = build_qformer(hf.state_dict(), "instructblip_qformer", backend, width)
    g = torch.Generator().manual_seed(7)
    queries, image = torch.randn(B, 4, 32, generator=g), torch.randn(B, 7, width, generator=g)
    ids, am = text_inputs()
    with torch.no_grad():
        want_joint = hf(input_ids=ids, attention_mask=torch.cat([torch.ones(B, 4, dtype=am.dtype), am], 1),
                        query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        ours_joint = qf(query_embeds=queries, input_ids=ids, attention_mask=am, image_embeds=image,
                        mask="bidirectional").last_hidden_state
        want_text = hf(input_ids=ids, attention_mask=am).last_hidden_state
        ours_text = qf(input_ids=ids, attention_mask=am).last_hidden_state
    assert (ours_joint - want_joint).abs().max() <= ATOL
    assert (ours_text - want_text).abs().max() <= ATOL


class Parts(nn.Module):
    """Our pieces under the attribute names `hf_names.DEFAULT_NAMES` expects (no LLM)."""

    def __init__(self, backend: str):
        super().__init__()
        vcfg, qcfg = tiny_vision_config(), tiny_qformer_config()
        self.visual_encoder = EVAViT(vcfg, attention=backend)
        self.ln_vision = LayerNormFP32(vcfg.width, eps=vcfg.layer_norm_eps)
        self.qformer = QFormer(qcfg, encoder_width=vcfg.width, attention=backend)
        self.query_tokens = nn.Parameter(torch.zeros(1, qcfg.num_query_tokens, qcfg.hidden_size))
        self.vision_proj = nn.Linear(qcfg.hidden_size, 256)
        self.text_proj = nn.Linear(qcfg.hidden_size, 256)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_model_itc_and_itm(backend):
    from transformers import Blip2ForImageTextRetrieval

    vcfg, qcfg = tiny_vision_config(), tiny_qformer_config()
    torch.manual_seed(0)
    hf = randomize_(Blip2ForImageTextRetrieval(hf_blip2_config(vcfg, qcfg)), seed=8, zero_k_bias=True)
    hf_sd = hf.state_dict()
    ours_sd = model_from_hf(hf_sd, "blip2_retrieval")
    back, left_out = model_to_hf(ours_sd, "blip2_retrieval")
    assert_same_state(back, hf_sd)
    assert left_out == []

    parts = Parts(backend).eval()
    load_exact(parts, ours_sd, {k for k in parts.state_dict() if k.startswith("qformer.lm_head.")})
    x, (ids, am) = image_inputs(vcfg), text_inputs()
    with torch.no_grad():
        want_itc = hf(pixel_values=x, input_ids=ids, attention_mask=am).logits_per_image
        want_itm = hf(pixel_values=x, input_ids=ids, attention_mask=am,
                      use_image_text_matching_head=True).logits_per_image
        image = parts.ln_vision(parts.visual_encoder(x))
        queries = parts.query_tokens.expand(B, -1, -1)
        q_out = parts.qformer(query_embeds=queries, image_embeds=image).last_hidden_state
        t_out = parts.qformer(input_ids=ids, attention_mask=am).last_hidden_state
        img_feat = F.normalize(parts.vision_proj(q_out), dim=-1)  # (B, Nq, E)
        txt_feat = F.normalize(parts.text_proj(t_out[:, 0]), dim=-1)  # (B, E)
        ours_itc = torch.einsum("iqe,te->iqt", img_feat, txt_feat).max(dim=1).values  # (B_img, B_txt)
        joint = parts.qformer(query_embeds=queries, input_ids=ids, attention_mask=am, image_embeds=image,
                              mask="bidirectional").last_hidden_state
        ours_itm = parts.itm_head(joint[:, : qcfg.num_query_tokens]).mean(dim=1)  # (B, 2)
    assert (ours_itc - want_itc).abs().max() <= ATOL
    assert (ours_itm - want_itm).abs().max() <= ATOL


def tiny_opt():
    from transformers import OPTConfig

    return OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=16)


@pytest.mark.parametrize("layout", ["blip2_generation", "instructblip_generation"])
def test_generation_models_names(layout):
    from transformers import Blip2ForConditionalGeneration, InstructBlipConfig, InstructBlipForConditionalGeneration

    vcfg, qcfg = tiny_vision_config(), tiny_qformer_config()
    torch.manual_seed(0)
    if layout == "blip2_generation":
        config = hf_blip2_config(vcfg, qcfg, tiny_opt())
        config.qformer_config.use_qformer_text_input = False  # as the released stage-2 checkpoints
        hf = Blip2ForConditionalGeneration(config)
    else:
        config = InstructBlipConfig(vision_config=hf_vision_config(vcfg).to_dict(),
                                    qformer_config=hf_instructblip_qformer_config(qcfg, vcfg.width).to_dict(),
                                    text_config=tiny_opt().to_dict(), num_query_tokens=qcfg.num_query_tokens)
        hf = InstructBlipForConditionalGeneration(config)
    hf_sd = randomize_(hf, seed=9, zero_k_bias=True).state_dict()
    ours_sd = model_from_hf(hf_sd, layout)
    assert "llm_proj.weight" in ours_sd and any(k.startswith("llm.") for k in ours_sd)
    back, left_out = model_to_hf(ours_sd, layout)
    assert_same_state(back, hf_sd)
    assert left_out == []

    parts = Parts("sdpa")
    del parts.vision_proj, parts.text_proj, parts.itm_head
    absent = {"qformer." + k for k in qformer_keys_without_hf(list(parts.qformer.state_dict()), layout)}
    load_exact(parts, {k: v for k, v in ours_sd.items() if not k.startswith(("llm.", "llm_proj."))}, absent)
