"""Caption and VQA evaluation read the split one batch at a time: peak memory does not grow with it.

The same tiny model evaluates 2k and 20k rows of tiny images, each in a fresh process. Holding the
decoded images (the split as fp32 tensors at the model's resolution, 12 KiB a row at 32 px) would add
over 200 MiB for the 18k extra rows; what may grow is the text that scoring keeps (references,
answers, predictions and CIDEr's n-grams: about 2 KiB a row here).
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env
from tests.distributed.test_export_generative import llm_folder
from tests.helpers.tiny_run import write_tiny_config

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("_eval_memory_script.py")
GROWTH_LIMIT_MIB = 64
"""Allowed peak growth from 2k to 20k rows (the decoded images alone would add 211 MiB)."""


def write_rows(out: Path, n: int) -> Path:
    """A split of `n` VQA rows (each also captioned) over 64 distinct 16-px images."""
    from PIL import Image

    from blip_train.data.schema import make_sample, write_split

    images = []
    for i in range(64):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(buf, format="PNG")
        images.append(buf.getvalue())
    write_split(out, (make_sample(images[i % 64], image_id=i, caption="a red square", captions=["a red square"],
                                  question="what color is it?", answer="red", answers=["red", "red"], task="vqa",
                                  question_id=i) for i in range(n)))
    return out


def peak_rss(config: Path, split: Path) -> dict:
    r = subprocess.run([sys.executable, str(SCRIPT), str(config), str(split)], cwd=REPO, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_generative_eval_peak_memory_is_flat_in_the_split_size(tiny_assets, tmp_path):
    llm = {"path": str(llm_folder(tiny_assets, "opt")), "dtype": "bf16", "max_txt_len": 12, "max_prompt_len": 16}
    config = write_tiny_config(tiny_assets, tmp_path / "run", model={"arch": "instruct", "llm": llm},
                               eval={"batch_size": 64, "num_beams": 1, "max_new_tokens": 1})
    small = peak_rss(config, write_rows(tmp_path / "rows_2k", 2000))
    large = peak_rss(config, write_rows(tmp_path / "rows_20k", 20000))
    print(f"peak RSS MiB, 2k rows: {small}; 20k rows: {large}")
    for task in ("caption", "vqa"):
        assert small[task]["samples"] == 2000 and large[task]["samples"] == 20000
        growth = large[task]["peak_rss_mib"] - small[task]["peak_rss_mib"]
        assert growth < GROWTH_LIMIT_MIB, (task, small, large)
