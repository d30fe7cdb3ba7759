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
