"""Generative evaluation end to end: in-training evaluation sharded over 2 ZeRO-3 ranks (every rank the
same calls, synced decoding) equals 1 rank, and `python -m blip_train.eval --task vqa|caption` on the
whole split, 2 ranks == 1 rank, sample by sample."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_train.evaluation.generative_eval import is_vqa_row
from tests.e2e.test_train_eval_entry import (_eval, assert_evaluations_leave_nothing_open, in_training_eval,
                                             logged_evaluations)
from tests.helpers.tiny_run import run_train, write_tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.dist]


def sharp_llm_folder(root: Path) -> Path:
    """A tiny random OPT whose weights are large (init std 0.5, not 0.02): its greedy answers depend on the
    question, so per-sample comparisons can see samples mixed up between ranks. At the usual init every
    question gets the same answer."""
    from transformers import AutoModelForCausalLM

    from blip_train.data.tokenizers import train_bpe_tokenizer
    from tests.parity.test_export_hf_models import TEXTS, _llm_config

    folder = root / "llm_opt_sharp"
    if not (folder / "config.json").is_file():
        tok = train_bpe_tokenizer(TEXTS, vocab_size=90, out_dir=folder, style="opt")
        config = _llm_config("opt", tok)
        config.init_std = 0.5
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def instruct_run(tiny_assets, tmp_path_factory):
    llm = {"path": str(sharp_llm_folder(tiny_assets)), "dtype": "bf16", "max_txt_len": 12, "max_prompt_len": 16}
    run = tmp_path_factory.mktemp("gen") / "instruct_opt"
    # In training: 6 VQA rows in 3 batches of 2 (uneven over 2 ranks).
    run_train(write_tiny_config(tiny_assets, run, model={"arch": "instruct", "llm": llm},
                                train={"max_steps": 4, "save_interval": 4},
                                eval={"interval": 2, "max_samples": 6, "batch_size": 2, "num_beams": 2,
                                      "max_new_tokens": 6}))
    return run


def assert_varied(predictions: list[str]) -> None:
    """Predictions a comparison can learn from: not all empty, not all the same (a mix-up of samples
    between ranks would go unseen). Each VQA sample has its own question, so the sharp tiny LLM's answers
    differ; its captions do not (its soft prompt differs by ~0.1% between images)."""
    assert any(p.strip() for p in predictions) and len(set(predictions)) > 1, predictions


def test_in_training_vqa_is_sharded_and_equals_one_rank(instruct_run, tmp_path):
    logged = logged_evaluations(instruct_run)
    assert sorted(logged) == [2, 4] and "eval/vqa_accuracy" in logged[4]
    one = in_training_eval(instruct_run, tmp_path / "one", 1)[0]
    two = in_training_eval(instruct_run, tmp_path / "two", 2)
    assert one["step"] == 4 and one["scores"] == logged[4]  # training's own evaluation of these weights
    assert len(one["predictions"]) == 6
    assert_varied(one["predictions"])
    for r in two:
        assert r["scores"] == one["scores"] and r["predictions"] == one["predictions"]
    # 3 batches: 2 generate calls per rank (rank 1 repeats one), 3 on one rank
    assert one["calls"]["generate"] == 3 and [r["calls"]["generate"] for r in two] == [2, 2]
    assert_evaluations_leave_nothing_open([one, *two])


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_generative_eval_two_ranks_equal_one(instruct_run, tiny_assets, task):
    from streaming import StreamingDataset

    val = tiny_assets / "data" / "val"
    # batches of 5: uneven over 2 ranks
    args = ["--task", task, "--checkpoint", str(instruct_run), "--data", str(val),
            "--set", "eval.num_beams=2", "--set", "eval.max_new_tokens=6", "--set", "eval.batch_size=5"]
    one = _eval(args)
    assert one.returncode == 0, one.stderr[-2000:]
    m1 = json.loads(one.stdout.strip().splitlines()[-1])
    p1 = json.loads(Path(m1["predictions_file"]).read_text())
    two = _eval(args, nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    m2 = json.loads(two.stdout.strip().splitlines()[-1])
    p2 = json.loads(Path(m2["predictions_file"]).read_text())

    # the whole split, not the run's eval.max_samples (6)
    ds = StreamingDataset(local=str(val), shuffle=False, batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    if task == "vqa":
        assert m1["num_questions"] == sum(map(is_vqa_row, rows)) > 6
        assert m1["num_images"] == len({int(r["image_id"]) for r in rows if is_vqa_row(r)})
    else:
        assert m1["num_images"] == len(rows) and m1["num_references"] == sum(len(r["captions"]) for r in rows)
    # every entry names the dataset's image (and question); the file is named after the split
    assert Path(m1["predictions_file"]).name == f"{task}_val.json"
    if task == "vqa":
        assert [(q["question_id"], q["image_id"]) for q in p1["predictions"]] == [
            (int(r["question_id"]), int(r["image_id"])) for r in rows if is_vqa_row(r)]
    else:
        assert [q["image_id"] for q in p1["predictions"]] == [int(r["image_id"]) for r in rows]
    key = "vqa_accuracy" if task == "vqa" else "cider"
    assert m2["world_size"] == 2 and m1[key] == m2[key] and f"chance_{key}" in m1
    assert p1["predictions"] == p2["predictions"]  # sample by sample, with their references
    texts = [p["prediction"] for p in p1["predictions"]]
    if task == "vqa":
        assert_varied(texts)
    else:
        assert any(t.strip() for t in texts) and len({json.dumps(p["references"]) for p in p1["predictions"]}) > 1
    assert p1["metrics"][key] == m1[key]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_generative_eval_runs_on_cuda(instruct_run, tiny_assets, task):
    """On a GPU node the model runs on cuda:LOCAL_RANK; 2 ranks (NCCL, needs 2 GPUs) equal 1."""
    args = ["--task", task, "--checkpoint", str(instruct_run), "--data", str(tiny_assets / "data" / "val"),
            "--set", "eval.num_beams=2", "--set", "eval.max_new_tokens=6", "--set", "run.device=cuda"]
    one = _eval(args)
    assert one.returncode == 0, one.stderr[-2000:]
    m1 = json.loads(one.stdout.strip().splitlines()[-1])
    assert m1["device"] == "cuda:0"
    p1 = json.loads(Path(m1["predictions_file"]).read_text())["predictions"]
    assert len(p1) == m1["num_questions" if task == "vqa" else "num_images"]
    if torch.cuda.device_count() >= 2:
        two = _eval(args, nproc=2)
        assert two.returncode == 0, two.stderr[-2000:]
        m2 = json.loads(two.stdout.strip().splitlines()[-1])
        assert m2["world_size"] == 2 and json.loads(Path(m2["predictions_file"]).read_text())["predictions"] == p1
