"""Entry points end to end: train a tiny stage-1 model, evaluate it with `python -m blip_train.eval`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env, torchrun
from tests.helpers.tiny_run import run_train, write_tiny_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("e2e") / "run"
    run_train(write_tiny_config(tiny_assets, run, train={"max_steps": 4, "save_interval": 4},
                                eval={"interval": 2, "k_test": 8, "batch_size": 16}))
    return run


def test_in_training_retrieval_evaluation_is_logged(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/r_mean" in r}
    assert sorted(evals) == [2, 4] and all(0.0 <= r["eval/img_r1"] <= 100.0 for r in evals.values())


def _eval(args, nproc=1):
    if nproc == 1:
        r = subprocess.run([sys.executable, "-m", "blip_train.eval", *args], cwd=REPO, env=clean_env(),
                           capture_output=True, text=True, timeout=300)
    else:
        r = torchrun(["-m", "blip_train.eval", *args], nproc=nproc, timeout=300)
    return r


def test_eval_prints_json_last_and_two_ranks_equal_one(trained, tiny_assets):
    args = ["--task", "retrieval", "--checkpoint", str(trained), "--data", str(tiny_assets / "data" / "val")]
    one = _eval(args)
    assert one.returncode == 0, one.stderr[-3000:]
    m1 = json.loads(one.stdout.strip().splitlines()[-1])
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "chance_img_r1"):
        assert 0.0 <= m1[key] <= 100.0
    assert m1["checkpoint"].endswith("step_0000004") and m1["untrained"] is False
    two = _eval(args, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    m2 = json.loads(two.stdout.strip().splitlines()[-1])
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean", "itc_img_r1"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-9), key
    # the saved per-query rankings are the ones the recalls were counted from
    saved = json.loads(Path(m2["predictions_file"]).read_text())
    assert saved["metrics"]["img_r1"] == m2["img_r1"]
    t2i, i2t = saved["predictions"]["text_to_image"], saved["predictions"]["image_to_text"]
    assert len(t2i) == m1["num_texts"] and len(i2t) == m1["num_images"]
    assert 100.0 * sum(q["rank"] < 5 for q in t2i) / len(t2i) == pytest.approx(m1["img_r5"])
    assert 100.0 * sum(q["rank"] == 0 for q in i2t) / len(i2t) == pytest.approx(m1["txt_r1"])
    assert all(q["top"][0]["text"] in q["correct_texts"] for q in i2t if q["rank"] == 0)
    untrained = _eval(args + ["--untrained"])
    assert json.loads(untrained.stdout.strip().splitlines()[-1])["untrained"] is True


def test_eval_refuses_bad_inputs_in_one_line(trained, tmp_path):
    r = _eval(["--task", "retrieval", "--checkpoint", str(tmp_path), "--data", str(tmp_path)])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("eval error:") and "no complete checkpoint" in r.stderr
    r = _eval(["--task", "retrieval", "--checkpoint", str(trained), "--data", str(tmp_path / "missing")])
    assert r.returncode == 2 and "not a directory" in r.stderr
