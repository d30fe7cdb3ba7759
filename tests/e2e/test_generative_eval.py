"""Generative evaluation end to end: in-training evaluation under 2-rank ZeRO-3 (every rank the same
calls, synced decoding) and `python -m blip_train.eval --task vqa|caption`, 2 ranks == 1 rank."""
from __future__ import annotations

import json

import pytest

from tests.dist.test_export_generative import llm_folder
from tests.e2e.test_train_eval_entry import _eval
from tests.helpers.tiny_run import run_train, write_tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.dist]


@pytest.fixture(scope="module")
def instruct_run(tiny_assets, tmp_path_factory):
    llm = {"path": str(llm_folder(tiny_assets, "opt")), "dtype": "bf16", "max_txt_len": 12, "max_prompt_len": 16}
    run = tmp_path_factory.mktemp("gen") / "instruct_opt"
    r = run_train(write_tiny_config(tiny_assets, run, model={"arch": "instruct", "llm": llm},
                                    train={"max_steps": 4, "save_interval": 4},
                                    eval={"interval": 2, "max_samples": 6, "batch_size": 4, "num_beams": 2,
                                          "max_new_tokens": 6}))
    return run, r.stdout


def test_in_training_evaluation_logs_vqa_metrics(instruct_run):
    run, stdout = instruct_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/vqa_accuracy" in r}
    assert sorted(evals) == [2, 4]
    assert all(0.0 <= r["eval/vqa_accuracy"] <= 100.0 for r in evals.values())
    assert "eval/vqa_accuracy" in stdout


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_generative_eval_two_ranks_equal_one(instruct_run, tiny_assets, task):
    run, _ = instruct_run
    args = ["--task", task, "--checkpoint", str(run), "--data", str(tiny_assets / "data" / "val"),
            "--set", "eval.max_samples=6", "--set", "eval.num_beams=2", "--set", "eval.max_new_tokens=6"]
    one, two = _eval(args), _eval(args, nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    m1, m2 = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, two))
    key = "vqa_accuracy" if task == "vqa" else "cider"
    assert m1[key] == pytest.approx(m2[key], abs=1e-9) and f"chance_{key}" in m1
    saved = json.loads(open(m1["predictions_file"]).read())
    assert saved["predictions"] and saved["metrics"][key] == m1[key]
