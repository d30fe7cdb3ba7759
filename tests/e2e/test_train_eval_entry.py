"""Entry points end to end: train a tiny stage-1 model, evaluate it with `python -m blip_train.eval`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_train.data.schema import verify_split
from tests.conftest import REPO, clean_env, torchrun
from tests.helpers.tiny_run import run_train, write_tiny_config

pytestmark = pytest.mark.e2e

IN_TRAINING_SCRIPT = REPO / "tests" / "dist" / "_in_training_eval_script.py"


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    # In training: 20 of the 24 val images in 3 batches of 8 (uneven over 2 ranks); standalone: all 24.
    run = tmp_path_factory.mktemp("e2e") / "run"
    run_train(write_tiny_config(tiny_assets, run, train={"max_steps": 4, "save_interval": 4},
                                eval={"interval": 2, "k_test": 8, "batch_size": 8, "max_samples": 20}))
    return run


def in_training_eval(run: Path, out: Path, nproc: int) -> list[dict]:
    """`evaluate_during_training` of the run's last weights under a ZeRO-3 engine on `nproc` ranks."""
    out.mkdir(parents=True, exist_ok=True)
    r = torchrun([str(IN_TRAINING_SCRIPT), str(run), str(out)], nproc=nproc, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(nproc)]


def logged_evaluations(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows
            if any(k.startswith("eval/") for k in r)}


def test_in_training_retrieval_is_sharded_and_equals_one_rank(trained, tmp_path):
    logged = logged_evaluations(trained)
    assert sorted(logged) == [2, 4]
    one = in_training_eval(trained, tmp_path / "one", 1)[0]
    two = in_training_eval(trained, tmp_path / "two", 2)
    # training's own (2-rank, sharded) evaluation is the 1-rank evaluation of the same weights
    assert one["step"] == 4 and one["scores"] == logged[4]
    assert all(r["scores"] == one["scores"] for r in two)
    # 20 images in 3 batches: 2 per rank (rank 1 repeats one); every module call count equal across ranks
    assert one["calls"]["encode_image"] == 3 and [r["calls"]["encode_image"] for r in two] == [2, 2]
    assert two[0]["calls"] == two[1]["calls"]
    texts = one["calls"]["encode_text"]
    assert texts > 2 and two[0]["calls"]["encode_text"] == math.ceil(texts / 2)
    assert two[0]["calls"]["itm_scores"] < one["calls"]["itm_scores"]


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
    # the whole split, not the run's eval.max_samples (20, the in-training monitor's cap)
    assert m1["num_images"] == verify_split(tiny_assets / "data" / "val") == 24 and m1["max_samples"] == 0
    for d in ("txt", "img"):
        assert m1[f"{d}_r1"] <= m1[f"{d}_r5"] <= m1[f"{d}_r10"]
    assert m1["checkpoint"].endswith("step_0000004") and m1["untrained"] is False and m1["device"] == "cpu"
    p1 = json.loads(Path(m1["predictions_file"]).read_text())["predictions"]
    two = _eval(args, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    m2 = json.loads(two.stdout.strip().splitlines()[-1])
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean", "itc_img_r1"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-9), key
    assert m2["world_size"] == 2
    # the saved per-query rankings are the ones the recalls were counted from
    saved = json.loads(Path(m2["predictions_file"]).read_text())
    assert saved["metrics"]["img_r1"] == m2["img_r1"]
    t2i, i2t = saved["predictions"]["text_to_image"], saved["predictions"]["image_to_text"]
    assert len(t2i) == m1["num_texts"] and len(i2t) == m1["num_images"]
    assert 100.0 * sum(q["rank"] < 5 for q in t2i) / len(t2i) == pytest.approx(m1["img_r5"])
    assert 100.0 * sum(q["rank"] == 0 for q in i2t) / len(i2t) == pytest.approx(m1["txt_r1"])
    assert all(q["top"][0]["text"] in q["correct_texts"] for q in i2t if q["rank"] == 0)
    # query by query, the same rankings and scores as on one rank, and not the same for every query
    assert saved["predictions"] == p1
    assert len({q["rank"] for q in t2i}) > 1 and len({q["rank"] for q in i2t}) > 1
    untrained = _eval(args + ["--untrained", "--max-samples", "5"])
    mu = json.loads(untrained.stdout.strip().splitlines()[-1])
    assert mu["untrained"] is True and mu["num_images"] == 5 and mu["max_samples"] == 5
    assert mu["num_texts"] == sum(len(q["correct_texts"]) for q in saved["predictions"]["image_to_text"][:5])


def _refused(r: subprocess.CompletedProcess, *words: str) -> bool:
    last = r.stderr.strip().splitlines()[-1]
    return r.returncode == 2 and last.startswith("eval error:") and all(w in last for w in words)


def test_eval_refuses_bad_inputs_in_one_line(trained, tmp_path, tiny_assets):
    r = _eval(["--task", "retrieval", "--checkpoint", str(tmp_path), "--data", str(tmp_path)])
    assert _refused(r, "no complete checkpoint")
    r = _eval(["--task", "retrieval", "--checkpoint", str(trained), "--data", str(tmp_path / "missing")])
    assert r.returncode == 2 and "not a directory" in r.stderr
    args = ["--task", "retrieval", "--checkpoint", str(trained), "--data", str(tiny_assets / "data" / "val")]
    # the in-training cap does not silently apply here: --max-samples says it
    assert _refused(_eval(args + ["--set", "eval.max_samples=3"]), "--max-samples")
    assert _refused(_eval(args + ["--max-samples", "-1"]), "--max-samples")
    if not torch.cuda.is_available():  # run.device is honoured, as in training
        assert _refused(_eval(args + ["--set", "run.device=cuda"]), "run.device", "no CUDA")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_runs_on_cuda_and_two_ranks_equal_one(trained, tiny_assets):
    """On a GPU node the model runs on cuda:LOCAL_RANK and 2 ranks gather over NCCL (needs 2 GPUs)."""
    args = ["--task", "retrieval", "--checkpoint", str(trained), "--data", str(tiny_assets / "data" / "val"),
            "--set", "run.device=cuda"]
    one = _eval(args)
    assert one.returncode == 0, one.stderr[-3000:]
    m1 = json.loads(one.stdout.strip().splitlines()[-1])
    assert m1["device"] == "cuda:0" and m1["num_images"] == 24 and math.isfinite(m1["r_mean"])
    if torch.cuda.device_count() >= 2:
        two = _eval(args, nproc=2)
        assert two.returncode == 0, two.stderr[-3000:]
        m2 = json.loads(two.stdout.strip().splitlines()[-1])
        assert m2["world_size"] == 2
        for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean", "itc_img_r1"):
            assert m2[key] == pytest.approx(m1[key], abs=1e-9), key
