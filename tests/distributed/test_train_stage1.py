"""Stage 1 through the real entry point on 2 ranks (gloo): ZeRO-3 and ZeRO-2 train; partitioning is real."""
from __future__ import annotations

import json

import pytest

from tests.conftest import torchrun
from tests.helpers.tiny_run import read_losses, run_train, write_tiny_config

pytestmark = pytest.mark.dist


def test_zero2_two_ranks_trains(tiny_assets, tmp_path):
    run = tmp_path / "z2"
    run_train(write_tiny_config(tiny_assets, run, deepspeed={"config": "zero2", "zero_stage": 2},
                                train={"max_steps": 8, "save_interval": 8}))
    losses = read_losses(run)
    assert sorted(losses) == list(range(1, 9)) and all(v == v for v in losses.values())
    assert losses[8] < losses[1]


def test_zero3_partitions_everything_and_frozen_tower_never_changes(tiny_assets, tmp_path):
    config = write_tiny_config(tiny_assets, tmp_path / "checks")
    report = tmp_path / "report.json"
    r = torchrun(["tests/distributed/_train_checks_script.py", str(config), str(report)], nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rep = json.loads(report.read_text())
    for rank_rep in rep["ranks"]:
        # Every parameter, frozen ones included, holds only its shard: about half on each of 2 ranks.
        assert rank_rep["unpartitioned"] == []
        for name, (ds_numel, shard) in rank_rep["shards"].items():
            assert shard == (ds_numel + 1) // 2, name
        assert rank_rep["frozen_changed"] == [] and rank_rep["frozen_with_grad"] == []
        assert rank_rep["trainable_changed"] > 0
