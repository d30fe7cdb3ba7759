"""bench/scale/'s arithmetic: the recipes it covers, the parameter counts it reads off the real configs, the
analytic ZeRO-3 minimum, and how it shrinks a recipe that cannot fit."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.scale.model import (BYTES_PER_TRAINABLE, GIB, RECIPES, Footprint, count_footprint, plan, target_gib)

RECIPE_DIR = Path(__file__).resolve().parents[2] / "blip_train" / "recipes"


def test_every_paper_recipe_is_benchmarked() -> None:
    paper = {p.stem for p in RECIPE_DIR.glob("*.yaml")}
    assert paper and {r.name for r in RECIPES} == paper


def test_the_minimum_is_every_partitioned_byte_over_the_ranks() -> None:
    fp = Footprint(trainable=1000, frozen_bytes=6000)
    assert BYTES_PER_TRAINABLE == 20  # bf16 weight + bf16 grad + fp32 master + fp32 grad + 2 fp32 moments
    assert fp.minimum_per_rank(2) == (6000 + 20 * 1000) / 2
    assert fp.minimum_per_rank(4) == fp.minimum_per_rank(2) / 2
    assert target_gib(2.0, 1.0) == pytest.approx(3.9)


def test_counts_of_the_real_stage1_towers() -> None:
    fp, parts = count_footprint(next(r for r in RECIPES if r.name == "blip2_stage1_vitg"))
    # The paper's 188M trainable (Q-Former + queries); ViT-g with 39 of its 40 blocks, frozen, in 16 bits.
    assert abs(fp.trainable - 188e6) / 188e6 < 0.01
    assert parts["visual_encoder"][0] == 0 and 0.98e9 < parts["visual_encoder"][1] < 0.99e9
    assert fp.frozen_bytes == 2 * fp.frozen
    assert fp.minimum_per_rank(2) / GIB == pytest.approx(2.66, abs=0.01)


def test_a_recipe_too_large_runs_with_the_layers_that_fit() -> None:
    vicuna = [r for r in RECIPES if r.name == "instructblip_vicuna7b"]
    (full, fp_full, why_full), = plan(vicuna, baseline_gib=1.0, budget=200 * GIB)
    assert full.llm_layers is None and why_full.startswith("full size")
    (small, fp_small, why), = plan(vicuna, baseline_gib=1.0, budget=14 * GIB)
    assert 1 <= small.llm_layers < 32 and f"{small.llm_layers} of 32 LLM layers" in why

    def need(fp: Footprint) -> float:
        return 2 * target_gib(fp.minimum_per_rank() / GIB, 1.0) * GIB

    assert need(fp_small) <= 14 * GIB
    one_more, _ = count_footprint(vicuna[0], small.llm_layers + 1)
    assert need(one_more) > 14 * GIB
    (none, _, why_none), = plan(vicuna, baseline_gib=1.0, budget=2 * GIB)
    assert why_none.startswith("skipped")


def test_the_zero2_minimum_keeps_weights_frozen_and_buffers_whole() -> None:
    fp = Footprint(trainable=1000, frozen_bytes=4000, buffer_bytes=300, zero_stage=2)
    # 16-bit weights (2 bytes), frozen parameters and buffers on every rank; the other 18 bytes partitioned.
    assert fp.minimum_per_rank(2) == 300 + 2 * 1000 + 4000 + 18 * 1000 / 2
    assert Footprint(1000, 4000, buffer_bytes=300).minimum_per_rank(2) == 300 + (4000 + 20 * 1000) / 2


def _vit_params(v) -> int:
    """timm ViT as EVAViT holds it (q_bias and v_bias, no k bias), from the config alone."""
    d, f = v.width, v.mlp_dim
    grid = (v.image_size // v.patch_size) ** 2
    embed = d + (grid + 1) * d + 3 * v.patch_size ** 2 * d + d  # cls, pos, patch conv (weight, bias)
    block = 2 * d + 3 * d * d + 2 * d + d * d + d + 2 * d + d * f + f + f * d + d
    return embed + v.layers * block + (2 * d if v.final_norm else 0)


def _text_params(t, vision_width: int, cross: bool, decoder: bool) -> int:
    """MED / BERT-base without token types and pooler: embeddings, per layer self-attention (+ cross-attention
    from the ViT, + the decoder's own self-attention), FFN; the LM head's transform and bias (its weight is the
    word embedding)."""
    h, i, v = t.hidden_size, t.intermediate_size, t.vocab_size

    def attn(kv: int) -> int:
        return 2 * (h * h + h) + 2 * (kv * h + h) + 2 * h  # q, out; k, v; LayerNorm

    layer = attn(h) + (attn(vision_width) if cross else 0) + (attn(h) if decoder else 0) + 2 * h * i + i + 3 * h
    return v * h + 512 * h + 2 * h + t.layers * layer + (h * h + h + 2 * h + v)


def test_counts_of_the_blip_vitb_model() -> None:
    from bench.scale.model import model_config

    recipe = next(r for r in RECIPES if r.name == "blip_pretrain_vitb_14m")
    fp, parts = count_footprint(recipe)
    m = model_config(recipe.name)
    vit, e = _vit_params(m.vision), m.embed_dim
    proj = (m.vision.width + 1) * e + (m.text.hidden_size + 1) * e
    online = vit + _text_params(m.text, m.vision.width, cross=True, decoder=True) + proj + 2 * m.text.hidden_size + 2 + 1
    momentum = vit + _text_params(m.text, m.vision.width, cross=False, decoder=False) + proj
    assert fp.trainable == online == 252_432_703
    assert fp.momentum == fp.frozen == momentum == 195_697_468
    assert parts["visual_encoder"] == [vit, 0] and parts["visual_encoder_m"] == [0, vit]
    # Against the paper's 224M: our MED also counts the decoder's own self-attention (12 x 2.4M) on top.
    assert abs(fp.trainable - recipe.paper_trainable) / recipe.paper_trainable < 0.13
    assert fp.frozen_bytes == 4 * momentum  # fp32 copies
    assert fp.buffer_bytes == 2 * e * m.momentum.queue_size * 4 + 8  # image and text queues, int64 pointer
    assert fp.zero_stage == 2
    want = fp.buffer_bytes + 4 * momentum + 2 * online + 18 * online / 2
    assert fp.minimum_per_rank(2) == pytest.approx(want)
    assert fp.minimum_per_rank(2) / GIB == pytest.approx(3.42, abs=0.01)


def test_counts_of_the_albef_model() -> None:
    fp, parts = count_footprint(next(r for r in RECIPES if r.name == "albef_pretrain_4m"))
    # ALBEF's momentum text model runs the fusion layers and the MLM head too: a full copy.
    assert fp.momentum == fp.trainable - parts["itm_head"][0] - parts["temp"][0]
    assert parts["text_m"][1] == parts["text"][0]


@pytest.mark.parametrize("name,encoder,encoder_params", [("xinstructblip_audio_vicuna7b", "audio_encoder", 86_187_264),
                                                         ("xinstructblip_3d_vicuna7b", "points_encoder", 21_859_200)])
def test_x_instructblip_counts_put_the_modality_encoder_with_the_frozen(name, encoder, encoder_params) -> None:
    """The released AudioSet AST (86.2M) and ULIP-2's Point-BERT (21.9M) are frozen, in the LLM's dtype; the Q-Former
    with its instruction input reads their width; the ViT is not built."""
    fp, parts = count_footprint(next(r for r in RECIPES if r.name == name))
    assert parts[encoder] == [0, encoder_params] and "visual_encoder" not in parts
    assert parts["llm"][0] == 0 and fp.trainable == sum(t for t, _ in parts.values())
    assert 175e6 < fp.trainable < 190e6 and fp.frozen_bytes == 2 * fp.frozen
