"""InstructBLIP on video (model.video_frames) through the real trainer: 2 ranks, ZeRO-3 (the frame embeddings
partitioned with the rest), a video split written in the converters' format, then `python -m blip_train.eval
--task vqa` on held-out clips; export refuses it in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import (assert_vqa_scores_are_earned, make_tiny_assets, run_train, trainable_weights,
                                    write_tiny_config)

pytestmark = pytest.mark.dist
FRAMES = 3


def video_split(src, out) -> str:
    """Each row of an image split as a clip of FRAMES frames: the image, then two other images of the split."""
    from streaming import StreamingDataset

    from blip_train.data.schema import write_split
    from blip_train.data.video import VIDEO_COLUMNS

    ds = StreamingDataset(local=str(src), shuffle=False, batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    clips = []
    for i, row in enumerate(rows):
        others = [rows[(i + k) % len(rows)]["image"] for k in (1, 2)]
        clips.append({**row, "frames": b"".join(others), "frame_sizes": [len(o) for o in others],
                      "frame_times": [0.5, 1.5, 2.5]})
    write_split(out, clips, extra_columns=VIDEO_COLUMNS)
    return str(out)


def test_instruct_trains_and_answers_on_video(tiny_assets, tmp_path):
    from tests.distributed.test_export_generative import llm_folder

    data = make_tiny_assets(tiny_assets)["data"]
    train, val = video_split(data / "train", tmp_path / "clips_train"), video_split(data / "val", tmp_path / "clips_val")
    llm = {"path": str(llm_folder(tiny_assets, "llama")), "dtype": "bf16", "max_txt_len": 12, "max_prompt_len": 16}
    run = tmp_path / "run"
    config = write_tiny_config(tiny_assets, run, model={"arch": "instruct", "llm": llm, "video_frames": FRAMES},
                               data={"train": [{"local": train, "name": "clips"}], "val": val},
                               train={"max_steps": 2, "save_interval": 2})
    out = run_train(config)
    assert "done: step 2" in out.stdout, out.stdout[-2000:]
    weights = trainable_weights(run, "step_0000002")
    assert tuple(weights["frame_pos"].shape) == (FRAMES, 32)  # trained (ZeRO-3 shards merged)

    def cli(*args):
        return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                              timeout=600)

    e = cli("-m", "blip_train.eval", "--task", "vqa", "--checkpoint", str(run), "--data", val, "--max-samples", "8")
    assert e.returncode == 0, e.stderr[-3000:]
    metrics = json.loads(e.stdout.strip().splitlines()[-1])
    assert_vqa_scores_are_earned(metrics)
    x = cli(str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert x.returncode == 2 and "model.video_frames=3" in x.stderr and len(x.stderr.strip().splitlines()) == 1
