"""tools/make_synthetic_dataset.py: determinism, readability with plain streaming, noise, refusal; the
fine-tuning split's striped shapes."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from tests.conftest import REPO, clean_env

from blip_train.data.schema import COLUMNS
from blip_train.data.synthetic import Shape, make_sample, render_scene, write_synthetic_dataset

TOOL = str(REPO / "tools" / "make_synthetic_dataset.py")


def _digest(split: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(split.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], env=clean_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_cli_writes_a_plain_streaming_readable_dataset(tmp_path):
    out = tmp_path / "d"
    r = _run("--out", str(out), "--num-samples", "30", "--image-size", "32", "--noise-fraction", "0.25")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["train"], summary["val"], summary["noisy"]) == (24, 6, 6)
    assert "make_synthetic_dataset: wrote 24 train + 6 val" in r.stdout

    from streaming import StreamingDataset
    ds = StreamingDataset(local=str(out / "train"), batch_size=1)
    assert len(ds) == 24
    row = ds[0]
    assert set(row) == set(COLUMNS)
    assert row["caption"] and row["question"] and row["answer"] and isinstance(row["captions"], list)
    assert sum(ds[i]["noisy"] for i in range(24)) == 6
    assert {ds[i]["task"] for i in range(24)} == {"caption", "vqa", "conversation"}

    again = _run("--out", str(out), "--num-samples", "30")
    assert again.returncode == 2 and again.stderr.strip().startswith("error: ") and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert _run("--help").returncode == 0


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(num_samples=24, image_size=32, noise_fraction=0.2)
    write_synthetic_dataset(tmp_path / "a", seed=5, **kw)
    write_synthetic_dataset(tmp_path / "b", seed=5, **kw)
    write_synthetic_dataset(tmp_path / "c", seed=6, **kw)
    for split in ("train", "val"):
        assert _digest(tmp_path / "a" / split) == _digest(tmp_path / "b" / split)
        assert _digest(tmp_path / "a" / split) != _digest(tmp_path / "c" / split)


def test_samples_are_consistent_with_the_scene():
    for i in range(60):
        s = make_sample(i, seed=0, image_size=32)
        assert s["caption"] == s["captions"][0] and s["noisy"] == 0
        if s["task"] == "vqa":
            assert len(s["answers"]) == 10 and s["answers"].count(s["answer"]) >= 8
        if s["question"].startswith("what color is the "):
            assert s["answer"] in s["caption"]
        if s["question"] == "how many shapes are there?":
            assert s["answer"] == ("two" if " and " in s["caption"] else "one")


def test_fine_tuning_split_names_its_stripes_and_is_balanced():
    samples = [make_sample(i, seed=0, image_size=64, patterns=True) for i in range(200)]
    again = make_sample(7, seed=0, image_size=64, patterns=True)
    assert again["image"] == samples[7]["image"] and again["captions"] == samples[7]["captions"]  # deterministic
    # its own scenes: not the main split's with stripes added
    assert sum(s["captions"] == make_sample(i, 0, 64)["captions"] for i, s in enumerate(samples)) < 20
    striped = ["striped" in s["caption"] for s in samples]
    assert all(("striped" in c) == striped[i] for i, s in enumerate(samples) for c in s["captions"] if " and " not in c)
    # the first shape alternates plain / striped with the index: the leading phrase says so
    leading = [s["captions"][0].split(" and ")[0] for s in samples]
    assert ["striped" in t for t in leading] == [i % 2 == 1 for i in range(200)]
    assert 0.5 <= sum(striped) / len(samples) <= 0.75  # second shapes are striped half the time
    # the stripes are in the pixels: half of the inside of a striped square is white, the rest its colour
    plain = np.asarray(render_scene([Shape("square", "red", "center", "large")], 64, random.Random(1)))
    lined = np.asarray(render_scene([Shape("square", "red", "center", "large", "striped")], 64, random.Random(1)))
    inside = lined[28:36, 28:36].reshape(-1, 3)
    assert (inside == 255).all(1).mean() == 0.5
    assert (plain[28:36, 28:36] == lined[28:36, 28:36]).all(-1).mean() == 0.5


def test_main_split_has_no_stripes():
    assert not any("striped" in c for i in range(100) for c in make_sample(i, seed=0, image_size=32)["captions"])
