"""BLIP-2 VQA fine-tuning end to end: `python -m blip_train.train` on a VQA-only split with the question-aware
Q-Former (stage 2, model.qformer_text_input), in-training VQA evaluation, then `python -m blip_train.eval
--task vqa` (and --task caption refused in one line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip_train.data.schema import write_split
from tests.e2e.test_generative_eval import sharp_llm_folder
from tests.e2e.test_train_eval_entry import _eval, logged_evaluations
from tests.helpers.tiny_run import assert_vqa_scores_are_earned, run_train, write_tiny_config

pytestmark = pytest.mark.e2e


def vqa_only(split: Path, out: Path) -> Path:
    """The VQA rows of a synthetic split, as their own split (a VQA-only split, as convert_vqa.py writes)."""
    from streaming import StreamingDataset

    if not (out / "index.json").is_file():
        ds = StreamingDataset(local=str(split), shuffle=False, batch_size=1)
        write_split(out, (ds[i] for i in range(ds.num_samples) if ds[i]["task"] == "vqa"))
    return out


@pytest.fixture(scope="module")
def vqa_run(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_ft")
    train, val = vqa_only(tiny_assets / "data" / "train", root / "train"), vqa_only(tiny_assets / "data" / "val",
                                                                                  root / "val")
    llm = {"path": str(sharp_llm_folder(tiny_assets)), "dtype": "bf16", "prompt": "Question: {} Answer:",
           "max_txt_len": 8, "max_prompt_len": 24}
    run = root / "run"
    config = write_tiny_config(
        tiny_assets, run, model={"arch": "stage2", "qformer_text_input": True, "llm": llm},
        data={"train": [{"local": str(train), "name": "vqa"}], "val": str(val)},
        train={"max_steps": 4, "save_interval": 4},
        eval={"interval": 2, "max_samples": 6, "batch_size": 3, "num_beams": 2, "vqa_max_new_tokens": 4})
    run_train(config, nproc=1)
    return run, val


def test_question_aware_vqa_trains_and_evaluates(vqa_run):
    run, val = vqa_run
    logged = logged_evaluations(run)
    assert sorted(logged) == [2, 4] and "eval/vqa_accuracy" in logged[4]  # eval.task auto: vqa for this model
    r = _eval(["--task", "vqa", "--checkpoint", str(run), "--data", str(val)])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["num_questions"] > 6
    assert_vqa_scores_are_earned(metrics)

    refused = _eval(["--task", "caption", "--checkpoint", str(run), "--data", str(val)])
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"eval error: --task caption: {run} is fine-tuned to answer questions (model.qformer_text_input=true); "
        "use --task vqa")
