"""Entry points end to end: train a tiny stage-1 model, evaluate it with `python -m blip_train.eval`."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_train.data.schema import verify_split, write_split
from tests.conftest import REPO, clean_env, torchrun
from tests.helpers.tiny_run import run_train, write_tiny_config

pytestmark = pytest.mark.e2e

IN_TRAINING_SCRIPT = REPO / "tests" / "distributed" / "_in_training_eval_script.py"


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


def assert_evaluations_leave_nothing_open(ranks: list[dict]) -> None:
    """A second evaluation in one process maps no more shared-memory segments than the first left mapped, and
    holds fewer new descriptors than one open streaming dataset would (12: a lazily opened file may add one)."""
    for r in ranks:
        (fds_first, mapped_first), (fds_second, mapped_second) = r["open_handles"]
        assert mapped_second == mapped_first and fds_second - fds_first < 12, r["open_handles"]


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
    assert_evaluations_leave_nothing_open([one, *two])


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
    assert "retrieval: images: 100%" in one.stderr  # progress bars
    table = one.stdout.splitlines()
    assert any(line.split()[:1] == ["TR@1"] and line.split()[-1] == "txt_r1" for line in table)
    assert any(line.split()[:1] == ["IR@1"] and line.split()[-1] == "img_r1" for line in table)
    assert Path(m1["predictions_file"]) == trained / "eval" / "retrieval_val.json"  # named after the split
    p1 = json.loads(Path(m1["predictions_file"]).read_text())["predictions"]
    ids = [int(r["image_id"]) for r in split_rows(tiny_assets / "data" / "val")]
    assert [q["image_id"] for q in p1["image_to_text"]] == ids  # the dataset's ids, not only positions
    assert all(q["image_id"] == ids[q["correct_image"]] and all(a["image_id"] == ids[a["image"]] for a in q["top"])
               for q in p1["text_to_image"])
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
    assert Path(mu["predictions_file"]).name == "retrieval_val_untrained.json"
    assert mu["num_texts"] == sum(len(q["correct_texts"]) for q in saved["predictions"]["image_to_text"][:5])


def split_rows(split: Path) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(split), shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


def test_retrieval_on_a_split_written_one_row_per_caption(trained, tiny_assets, tmp_path):
    """A test split converted without --per-image (a row per caption, each with the image's captions and
    image_id) is evaluated as the images it holds: the per-image split's numbers, and a line saying so."""
    val = tiny_assets / "data" / "val"
    rows = [dict(r) for r in split_rows(val)]
    write_split(tmp_path / "val_rows", [dict(r, caption=c) for r in rows for c in r["captions"]])
    args = ["--task", "retrieval", "--checkpoint", str(trained), "--max-samples", "20"]
    per_image = _eval(args + ["--data", str(val)])
    per_caption = _eval(args + ["--data", str(tmp_path / "val_rows")])
    assert per_image.returncode == 0 and per_caption.returncode == 0, per_caption.stderr[-3000:]
    mi = json.loads(per_image.stdout.strip().splitlines()[-1])
    mc = json.loads(per_caption.stdout.strip().splitlines()[-1])
    n_rows = sum(len(r["captions"]) for r in rows[:20])
    assert f"{n_rows} rows are 20 images" in per_caption.stdout
    assert mc["num_images"] == mi["num_images"] == 20 and mc["num_texts"] == mi["num_texts"] == n_rows
    assert mc["num_rows"] == n_rows and mi["num_rows"] == 20
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean", "itc_img_r1", "chance_img_r1"):
        assert mc[key] == mi[key], key
    # the second split's predictions beside the first's
    assert Path(mc["predictions_file"]).name == "retrieval_val_rows.json"
    assert Path(mi["predictions_file"]).is_file() and mi["predictions_file"] != mc["predictions_file"]

    for r in rows:
        r["image_id"] = 1  # ids that do not identify images: refused, not averaged into numbers
    write_split(tmp_path / "one_id", rows)
    r = _eval(["--task", "retrieval", "--checkpoint", str(trained), "--data", str(tmp_path / "one_id")])
    assert _refused(r, "rows 0 and 1 share image_id 1 but carry different captions", "--per-image")
    assert "Traceback" not in r.stderr


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
    (tmp_path / "images").mkdir()  # a folder of images, not a converted split
    r = _eval(["--task", "retrieval", "--checkpoint", str(trained), "--data", str(tmp_path / "images")])
    assert _refused(r, "images: no index.json (not an MDS split") and "Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["truncated optim_states", "truncated model_states", "missing model_states"])
def test_eval_names_a_damaged_checkpoint_file(trained, tiny_assets, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    kind = damage.split()[1]
    shard = next((run / "checkpoints" / "step_0000004").glob(f"*zero_pp_rank_1_mp_rank_00_{kind}.pt"))
    if damage.startswith("truncated"):
        shard.write_bytes(shard.read_bytes()[:4096])
    else:
        shard.unlink()
    r = _eval(["--task", "retrieval", "--checkpoint", str(run), "--data", str(tiny_assets / "data" / "val")])
    what = "4,096 bytes, " if damage.startswith("truncated") else "missing"
    assert _refused(r, "checkpoint", "step_0000004 is damaged:", f"{shard.name}: {what}"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr


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
