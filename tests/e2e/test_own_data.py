"""README.md's "Train on your own data" section, run as written: its commands are read from the README
itself, on a tiny dataset made here. The one addition: the training command gets tiny model sizes
(the template is ViT-g / BERT-base sized) and a short schedule, appended as --set overrides."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_train.config import VisionConfig
from blip_train.data.synthetic import make_sample
from blip_train.data.tokenizers import train_wordpiece_tokenizer
from blip_train.models.eva_vit import EVAViT
from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import QFORMER, VISION

pytestmark = pytest.mark.e2e

TINY = ([f"model.vision.{k}={v}" for k, v in VISION.items()] + [f"model.qformer.{k}={v}" for k, v in QFORMER.items()]
        + ["data.image_size=32", "model.embed_dim=16", "model.max_txt_len=20", "run.device=cpu",
           "data.num_workers=0", "train.max_steps=4", "train.micro_batch_size=4", "train.log_interval=1",
           "train.save_interval=2", "optim.warmup_steps=1", "eval.interval=2", "eval.k_test=8",
           "eval.batch_size=16"])


def readme_commands(section: str) -> list[str]:
    """The shell lines of the first bash block under `## <section>` in README.md (comments dropped)."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def make_my_data(root: Path) -> None:
    """What a user brings: images, COCO caption files, EVA weights, bert-base-uncased's vocab.txt."""
    images = root / "my_data" / "images"
    images.mkdir(parents=True)
    files = {"train": [], "test": []}
    texts = []
    for i in range(60):
        s = make_sample(i, seed=1, image_size=32)
        (images / f"{i:04d}.jpg").write_bytes(s["image"])
        files["train" if i < 48 else "test"].append((i, s["captions"][:2]))
        texts += s["captions"]
    for split, entries in files.items():
        coco = {"images": [{"id": i, "file_name": f"{i:04d}.jpg"} for i, _ in entries],
                "annotations": [{"image_id": i, "caption": c} for i, caps in entries for c in caps]}
        (root / "my_data" / f"{split}.json").write_text(json.dumps(coco))
    torch.manual_seed(0)
    torch.save(EVAViT(VisionConfig(**VISION)).state_dict(), root / "eva_vit_g.pth")
    train_wordpiece_tokenizer(texts, 180, root / "bert_tmp")
    (root / "bert-base-uncased").mkdir()
    shutil.copy(root / "bert_tmp" / "vocab.txt", root / "bert-base-uncased" / "vocab.txt")


def test_readme_own_data_section_runs_as_written(tmp_path):
    make_my_data(tmp_path)
    for name in ("tools", "blip_train"):  # the commands are written for a checkout's root
        (tmp_path / name).symlink_to(REPO / name)
    commands = readme_commands("Train on your own data")
    assert [c.split()[0] for c in commands] == ["python"] * 4 + ["cp", "python", "python"]
    outputs = []
    for line in commands:
        argv = shlex.split(line)
        if argv[0] == "cp":
            shutil.copy(tmp_path / argv[1], tmp_path / argv[2])
            continue
        argv[0] = sys.executable
        if argv[1:3] == ["-m", "blip_train.train"]:
            argv += [a for s in TINY for a in ("--set", s)]
        r = subprocess.run(argv, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs.append(r.stdout)
    assert "done: step 4, checkpoint " in outputs[-2]
    metrics = json.loads(outputs[-1].strip().splitlines()[-1])
    assert metrics["num_images"] == 12 and metrics["num_texts"] == 24  # the whole test split, per image
    assert metrics["task"] == "retrieval" and metrics["checkpoint"].endswith("step_0000004")
