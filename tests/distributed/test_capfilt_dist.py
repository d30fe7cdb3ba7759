"""tools/capfilt.py on a trained tiny stage-1 checkpoint: 2 ranks give exactly the 1-rank output,
a time-boxed 2-rank run finishes on 1 rank to the same output, and the CLI refuses to overwrite; a BLIP run
captions and filters, or captions (--captioner) for the stage-1 filter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env, torchrun
from tests.helpers.tiny_run import VISION, run_train, write_tiny_blip_config, write_tiny_config

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


@pytest.fixture(scope="module")
def blip_run(setup, tiny_assets) -> Path:
    """A tiny BLIP run at 48 px (the stage-1 run reads 32 px): a captioner whose input differs from the filter's."""
    run = setup["root"] / "blip_run"
    run_train(write_tiny_blip_config(tiny_assets, run, train={"max_steps": 2, "save_interval": 2},
                                     data={"image_size": 48},
                                     model={"vision": dict(VISION, frozen=False, final_norm=True, image_size=48)}))
    return run


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


def test_a_blip_run_is_captioner_and_filter(setup, blip_run) -> None:
    """A BLIP checkpoint serves CapFilt as the paper defines it: its decoder samples, its ITM and ITC filter."""
    report = ok(capfilt(dict(setup, ckpt=blip_run), setup["root"] / "blip_out"))
    assert report["images_seen"] == 36 and report["noise"]["noisy_web"] == 11
    kept = rows(setup["root"] / "blip_out")
    assert kept and all(r["captions"] for r in kept)
    assert any("synthetic" in r["caption_sources"] for r in kept)  # the decoder's captions made it through


def test_a_blip_captioner_writes_the_captions_a_stage1_run_filters(setup, blip_run) -> None:
    """--captioner (BLIP's CapFilt with two models): every synthetic caption is one the BLIP run samples itself at
    48 px from the chunk's generator, crossing as text to the 32 px stage-1 filter; the report names the captioner."""
    import torch

    from blip_train.capfilt import chunk_seed, decode_captions
    from blip_train.data.collate import pre_caption
    from blip_train.data.transforms import build_transform
    from blip_train.eval import load_run_config
    from blip_train.training.stages import load_trained_retrieval_model

    out = setup["root"] / "two_models"
    r = capfilt(setup, out, "--captioner", str(blip_run), "--itm-threshold", "0", "--keep-top", "3")
    report = ok(r)  # threshold 0, ITC off: every distinct synthetic caption is kept
    cfg, ckpt_dir, tag = load_run_config(str(blip_run), [])
    assert report["settings"]["captioner"] == {"checkpoint": str((ckpt_dir / tag).resolve()), "image_size": 48}
    _, filter_dir, filter_tag = load_run_config(str(setup["ckpt"]), [])
    assert report["settings"]["checkpoint"] == str((filter_dir / filter_tag).resolve())
    assert "capfilt: captions by" in r.stdout

    model, tok = load_trained_retrieval_model(cfg, ckpt_dir, tag, device_type="cpu")
    model.eval()
    transform = build_transform(48, train=False)
    inputs = rows(setup["data"])
    expected: dict[int, set[str]] = {}
    for chunk in range(0, len(inputs), 8):  # ARGS: --chunk-size 8 --batch-size 4 --num-captions 3 --max-len 8
        generator = torch.Generator().manual_seed(chunk_seed(0, chunk // 8))
        for start in range(chunk, min(chunk + 8, len(inputs)), 4):
            batch = inputs[start:start + 4]
            with torch.no_grad():
                ids = model.generate_captions(torch.stack([transform(x["image"]) for x in batch]), tok.bos_token_id,
                                              tok.sep_token_id, tok.pad_token_id, max_len=8, top_p=0.9,
                                              num_captions=3, generator=generator)
            texts = decode_captions(tok, ids)
            for b, x in enumerate(batch):
                expected[start + b] = {t for t in texts[3 * b:3 * b + 3] if t} - {pre_caption(x["caption"])}
    kept = rows(out)
    assert len(kept) == 36 and report["synthetic"]["kept"] > 0
    for row in kept:
        synthetic = {c for c, src in zip(row["captions"], row["caption_sources"]) if src == "synthetic"}
        assert synthetic == expected[row["orig_index"]], row["orig_index"]

    # The same output dir resumed without the captioner is another run.
    r = capfilt(setup, out.parent / "two_models_part", "--captioner", str(blip_run), "--max-chunks", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    r = capfilt(setup, out.parent / "two_models_part")
    assert r.returncode == 2 and "captioner" in r.stderr.strip().splitlines()[-1]


def test_a_captioner_that_cannot_caption_is_refused_in_one_line(setup, blip_run) -> None:
    """An ALBEF run has no decoder: refused before any work, naming --captioner; so is a missing path. (The ALBEF
    run is the BLIP run with an ALBEF config: the refusal reads the config, never the weights.)"""
    import shutil

    import yaml

    albef = setup["root"] / "albef_run"
    shutil.copytree(blip_run, albef)
    for cfg_file in albef.glob("config*.yaml"):
        data = yaml.safe_load(cfg_file.read_text())
        data["model"]["arch"] = "albef"
        data["model"]["text"].update(fusion_layer=1, decoder=False)
        cfg_file.write_text(yaml.safe_dump(data))
    for captioner, words in ((albef, "model.arch=albef has no text decoder"), (setup["root"] / "no_run", "no such")):
        out = setup["root"] / f"refused_{captioner.name}"
        r = capfilt(setup, out, "--captioner", str(captioner))
        assert r.returncode == 2, r.stderr[-3000:]
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("error: --captioner") and words in line and not out.exists()
