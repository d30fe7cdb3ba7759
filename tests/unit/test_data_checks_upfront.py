"""Data a run cannot use is refused before any process group, model or engine exists: one line naming
the key. In-training evaluation of InstructBLIP on a captions-only split (COCO) needs eval.task=caption."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from PIL import Image

from blip_train.config import ConfigError, load_config
from blip_train.data.datasets import check_local_splits
from blip_train.data.images import encode_jpeg
from blip_train.data.schema import write_split
from blip_train.evaluation.in_training import check_eval_split
from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import write_tiny_config


def _captions_only(out):
    img = encode_jpeg(Image.new("RGB", (32, 32), (200, 10, 10)))
    write_split(out, ({"image": img, "image_id": i, "caption": f"caption {i}", "captions": [f"caption {i}"]}
                      for i in range(4)))
    return out


def _instruct_cfg(tiny_assets, tmp_path, *sets):
    from tests.distributed.test_export_generative import llm_folder

    llm = {"path": str(llm_folder(tiny_assets, "opt")), "max_txt_len": 12, "max_prompt_len": 16}
    path = write_tiny_config(tiny_assets, tmp_path / "run", model={"arch": "instruct", "llm": llm})
    return load_config(str(path), ["eval.interval=2", *sets])


def test_vqa_evaluation_on_a_captions_only_split_is_refused(tiny_assets, tmp_path):
    coco_like = _captions_only(tmp_path / "coco_val")
    with pytest.raises(ConfigError, match=r"data.val: .*coco_val has no VQA rows .* set eval.task=caption"):
        check_eval_split(_instruct_cfg(tiny_assets, tmp_path, f"data.val={coco_like}"))
    check_eval_split(_instruct_cfg(tiny_assets, tmp_path, f"data.val={coco_like}", "eval.task=caption"))
    check_eval_split(_instruct_cfg(tiny_assets, tmp_path))  # the synthetic split has VQA rows


def test_missing_splits_are_refused_naming_the_key(tiny_assets, tmp_path):
    cfg = _instruct_cfg(tiny_assets, tmp_path, f"data.val={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"^data.val: .*nope: split directory does not exist"):
        check_eval_split(cfg)
    cfg = load_config(None, [f"data.train=[{{local: {tmp_path / 'gone'}}}, {{local: x, remote: s3://b/x}}]"])
    with pytest.raises(ConfigError, match=r"^data.train\[0\].local: .*gone: split directory does not exist"):
        check_local_splits(cfg.data)


def test_train_refuses_a_missing_split_before_any_work(tiny_assets, tmp_path):
    path = write_tiny_config(tiny_assets, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "blip_train.train", "--config", str(path),
                        "--set", f"data.train=[{{local: {tmp_path / 'missing'}}}]"],
                       env=clean_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: data.train[0].local:") and "missing" in last
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing started


@pytest.mark.parametrize("arch, key", [
    ("stage1", "model.vision.weights"), ("stage1", "model.qformer.tokenizer"), ("stage1", "model.qformer.bert_init"),
    ("stage1", "model.init_from"), ("stage2", "model.llm.path"), ("instruct", "model.llm.path"),
    ("blip", "model.text.tokenizer"), ("blip", "model.text.bert_init"), ("albef", "model.text.tokenizer"),
    ("blip", "eval.answer_list")])
def test_every_missing_input_is_refused_naming_its_key(tmp_path, arch, key):
    """Each local input a run reads is checked at start, for the architectures that read it."""
    from blip_train.config import check_input_paths

    sets = [f"model.arch={arch}", f"{key}={tmp_path / 'gone'}"]
    if arch in ("blip", "albef"):
        sets.append("model.vision.frozen=false")
    if key == "eval.answer_list":
        sets += ["model.objective=vqa", "eval.interval=2", f"data.val={tmp_path}"]
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: .*gone does not exist$"):
        check_input_paths(load_config(None, sets))
