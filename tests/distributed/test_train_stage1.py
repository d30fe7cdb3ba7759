"""Stage 1 through the real entry point on 2 ranks (gloo): ZeRO-3 and ZeRO-2 train; partitioning is real."""
from __future__ import annotations

import json

import pytest

from blip_train.training.host_memory import read_memory_trace
from tests.conftest import torchrun
from tests.helpers.tiny_run import read_losses, run_train, write_tiny_config

pytestmark = pytest.mark.dist


def test_zero2_two_ranks_trains(tiny_assets, tmp_path):
    run = tmp_path / "z2"
    run_train(write_tiny_config(tiny_assets, run, deepspeed={"config": "zero2", "zero_stage": 2},
                                train={"max_steps": 8, "save_interval": 8}, run={"memory_trace": True}))
    losses = read_losses(run)
    assert sorted(losses) == list(range(1, 9)) and all(v == v for v in losses.values())
    assert losses[8] < losses[1]
    # run.memory_trace: every rank's resident memory at each phase, in order, the peak never falling.
    for rank in range(2):
        trace = read_memory_trace(run / "memory" / f"rank{rank}.jsonl")
        phases = [m["phase"] for m in trace]
        assert phases == ["start", "built", "engine"] + ["data", "forward", "backward", "step"] * 8 + ["saved"]
        assert [m["step"] for m in trace][-2:] == [8, 8]
        peaks = [m["peak_gib"] for m in trace]
        assert peaks == sorted(peaks) and all(0 < m["rss_gib"] <= m["peak_gib"] + 1e-3 for m in trace)
        assert [m["t"] for m in trace] == sorted(m["t"] for m in trace)


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
