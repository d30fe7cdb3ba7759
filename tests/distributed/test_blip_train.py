"""BLIP / ALBEF through the real trainer and engine on 2 ranks: the momentum encoders move shard by shard
exactly as the EMA says (ZeRO-3 partitions, copies DeepSpeed keeps whole, ZeRO-2), the feature queue is the
same on every rank, their saved state reloads at another world size, and a resume is bit-exact."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import torchrun
from tests.helpers.tiny_run import (config_with_output_dir, read_losses, train_and_dump, trainable_weights,
                                    write_tiny_blip_config)

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("sets", [("deepspeed.param_persistence_threshold=0",),
                                  ("deepspeed.param_persistence_threshold=100000000",),
                                  ("deepspeed.config=zero2", "deepspeed.zero_stage=2")],
                         ids=["zero3", "zero3-persistent", "zero2"])
def test_momentum_update_and_queue(tiny_assets, tmp_path, sets):
    from blip_train.config import load_config
    from blip_train.training.momentum import load_momentum_state_
    from blip_train.training.stages import build_blip_model

    config = write_tiny_blip_config(tiny_assets, tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    r = torchrun(["tests/distributed/_momentum_script.py", str(config), str(out), *sets], nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["exact"], rep  # gathered copies == decay * before + (1 - decay) * master, bit for bit
    assert rep["moved"] > rep["copies"] // 2 and rep["dtypes"] == ["torch.float32"]
    zero3 = "zero2" not in sets[0]
    assert rep["zero3"] == (rep["copies"] if zero3 else 0)
    # threshold 0: every copy lives as partitions only; a large threshold keeps every copy whole as well (the
    # update then re-assembles the whole data from the updated partitions)
    assert rep["whole"] == (0 if sets[0].endswith("=0") else rep["copies"])
    assert rep["queues_equal"] and rep["ptr"] == [2 * 2 * 4 % 32]  # 2 forwards of 2 ranks x 4

    # The rank files reload into one whole (unpartitioned) model: the same copies and queue.
    model, _ = build_blip_model(load_config(str(config), list(sets)))
    load_momentum_state_(model, out)
    expected = torch.load(out / "copies.pt")
    copies = {n: p for n, p in model.named_parameters() if n in expected}
    assert copies.keys() == expected.keys()
    assert all(torch.equal(copies[n], expected[n]) for n in expected)


def test_blip_resume_is_exact(tiny_assets, tmp_path):
    """Steps 3-4 after a resume from step 2 equal the uninterrupted run: losses, trained weights, and the
    momentum copies (the queue enters the step-3 ITC loss)."""
    full = tmp_path / "full"
    config = write_tiny_blip_config(tiny_assets, full)
    sets = ("train.max_steps=4", "train.save_interval=2")
    train_and_dump(config, tmp_path / "full.pt", *sets)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    r = train_and_dump(config_with_output_dir(config, resumed), tmp_path / "resumed.pt", *sets)
    assert "at step 2" in r.stdout
    a, b = read_losses(full), read_losses(resumed)
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in (3, 4)), (a, b)
    wa, wb = trainable_weights(full, "step_0000004"), trainable_weights(resumed, "step_0000004")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    da, db = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    momentum = [k for k in da["frozen"] if "_m." in k]
    assert momentum and set(da["frozen"]) == set(momentum)  # BLIP freezes nothing but the copies
    assert all(torch.equal(da["frozen"][k], db["frozen"][k]) for k in momentum)


def test_albef_trains_on_two_ranks(tiny_assets, tmp_path):
    run = tmp_path / "albef"
    config = write_tiny_blip_config(tiny_assets, run, arch="albef")
    train_and_dump(config, tmp_path / "albef.pt", "train.max_steps=3", "train.save_interval=3")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss_mlm" in r][-1]
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("train/loss_itc", "train/loss_itm", "train/loss_mlm"))
