"""Ranks start from identical weights but draw their own randomness (dropout, ITM negatives); a rerun
of the same command is bit-identical."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, torchrun
from tests.helpers.tiny_run import trainable_weights, write_tiny_config

pytestmark = pytest.mark.dist
STEPS = 3


def _run(tiny_assets, out):
    config = write_tiny_config(tiny_assets, out, train={"max_steps": STEPS, "save_interval": STEPS})
    report = out.parent / f"{out.name}.json"
    r = torchrun([str(REPO / "tests/distributed/_rank_rng_script.py"), str(config), str(report)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(report.read_text())


def test_ranks_draw_their_own_randomness_and_reruns_are_identical(tiny_assets, tmp_path):
    first = _run(tiny_assets, tmp_path / "a")
    rank0, rank1 = first["ranks"]
    assert first["step"] == STEPS and len(rank0) == len(rank1) == STEPS
    for step in range(STEPS):
        assert rank0[step]["dropout"] != rank1[step]["dropout"], f"step {step + 1}: same dropout mask on both ranks"
        assert rank0[step]["negatives"] != rank1[step]["negatives"], f"step {step + 1}: same ITM negatives"
    again = _run(tiny_assets, tmp_path / "b")
    assert again == first
    tag = f"step_{STEPS:07d}"
    wa, wb = trainable_weights(tmp_path / "a", tag), trainable_weights(tmp_path / "b", tag)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
