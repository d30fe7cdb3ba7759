"""tools/capfilt.py on a trained tiny stage-1 checkpoint: 2 ranks give exactly the 1-rank output,
a time-boxed 2-rank run finishes on 1 rank to the same output, and the CLI refuses to overwrite."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env, torchrun
from tests.helpers.tiny_run import run_train, write_tiny_blip_config, write_tiny_config

pytestmark = pytest.mark.dist
ARGS = ["--num-captions", "3", "--keep-top", "2", "--max-len", "8", "--chunk-size", "8", "--batch-size", "4"]
"""Default thresholds: calibrated to keep 75% of the input's web captions (the same on every rank)."""


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory) -> dict:
    from blip_train.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("capfilt")
    run_train(write_tiny_config(tiny_assets, root / "run", train={"max_steps": 2, "save_interval": 2}))
    write_synthetic_dataset(root / "data", num_samples=36, seed=5, noise_fraction=0.3, val_fraction=0.0,
                            image_size=32)
    return {"root": root, "ckpt": root / "run", "data": root / "data" / "train"}


def capfilt(setup: dict, out: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    args = ["tools/capfilt.py", "--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]),
            "--out", str(out), *ARGS, *extra]
    if nproc == 1:
        return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                              timeout=600)
    return torchrun(args, nproc=nproc)


def rows(split: Path) -> list[dict]:
    from streaming import LocalDataset
    ds = LocalDataset(str(split))
    return [dict(ds[i]) for i in range(len(ds))]


def ok(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_two_ranks_equal_one_and_resume_across_world_sizes(setup) -> None:
    one = ok(capfilt(setup, setup["root"] / "one"))
    two = ok(capfilt(setup, setup["root"] / "two", nproc=2))
    assert one == two
    assert one["images_seen"] == 36 and one["noise"]["noisy_web"] == 11
    reference = rows(setup["root"] / "one")
    assert rows(setup["root"] / "two") == reference
    assert [r["orig_index"] for r in reference] == sorted(r["orig_index"] for r in reference)
    assert {r["source"] for r in reference} == {"capfilt"}
    assert one["thresholds"].startswith("thresholds (keep_rate: keep 75% of the input's web captions")
    assert 0.75 <= one["web"]["kept_rate"] <= 0.85 and one["images_kept_rate"] >= 0.75

    # 2 ranks stop after one chunk each (2 of 5 chunks done), then 1 rank finishes the job.
    part = setup["root"] / "part"
    r = capfilt(setup, part, "--max-chunks", "1", nproc=2)
    assert r.returncode == 0 and "run the same command again" in r.stdout, r.stderr[-3000:]
    assert len(list((part / ".parts").glob("chunk_*.json"))) == 2
    assert ok(capfilt(setup, part)) == one
    assert rows(part) == reference


def test_cli_refuses_to_overwrite_in_one_line(setup) -> None:
    out = setup["root"] / "exists"
    out.mkdir()
    (out / "file").write_text("x")
    r = capfilt(setup, out)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "--overwrite" in r.stderr
    r = capfilt(setup, setup["root"] / "o2", "--top-p", "1.5")
    assert r.returncode == 2 and "top_p" in r.stderr.strip().splitlines()[-1]
    r = capfilt(setup, setup["root"] / "o3", "--itm-threshold", "1.0", "--num-captions", "0")
    assert r.returncode == 2 and "only 0 of 36 images kept a caption" in r.stderr.strip().splitlines()[-1]
    assert not (setup["root"] / "o3" / "index.json").exists()


def test_a_blip_run_is_captioner_and_filter(setup, tiny_assets) -> None:
    """A BLIP checkpoint serves CapFilt as the paper defines it: its decoder samples, its ITM and ITC filter."""
    run = setup["root"] / "blip_run"
    run_train(write_tiny_blip_config(tiny_assets, run, train={"max_steps": 2, "save_interval": 2}))
    report = ok(capfilt(dict(setup, ckpt=run), setup["root"] / "blip_out"))
    assert report["images_seen"] == 36 and report["noise"]["noisy_web"] == 11
    kept = rows(setup["root"] / "blip_out")
    assert kept and all(r["captions"] for r in kept)
    assert any("synthetic" in r["caption_sources"] for r in kept)  # the decoder's captions made it through
