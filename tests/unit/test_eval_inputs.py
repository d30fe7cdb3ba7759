"""What standalone evaluation reads and shows: which config rebuilds the model, retrieval splits written one
row per caption, damaged checkpoint files, progress bars, and the examples TensorBoard shows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from blip_train.data.schema import write_split
from blip_train.data.synthetic import make_sample
from blip_train.evaluation import distributed
from blip_train.evaluation.examples import CANVAS, caption_table, render_retrieval_example, vqa_table
from blip_train.evaluation.stage1_eval import RetrievalSplitError, load_retrieval_split


def per_caption_rows(n_images: int) -> list[dict]:
    """A split as convert_coco.py writes it without --per-image: a row per caption, each carrying the
    image's full captions list and its image_id."""
    rows = []
    for i in range(n_images):
        s = make_sample(i, seed=3, image_size=16)
        rows += [dict(s, caption=c) for c in s["captions"]]
    return rows


def test_retrieval_groups_the_rows_of_one_image(tmp_path):
    rows = per_caption_rows(5)
    write_split(tmp_path / "test", rows)
    split = load_retrieval_split(str(tmp_path / "test"))
    assert split.rows_read == len(rows) > 5
    assert split.image_ids == [0, 1, 2, 3, 4]
    assert split.captions == [make_sample(i, 3, 16)["captions"] for i in range(5)]
    assert [rows[r]["image_id"] for r in split.rows] == split.image_ids  # each image read from its first row
    assert split.describe_grouping("test") == (f"retrieval: test: {len(rows)} rows are 5 images (rows with the same "
                                               "image_id and captions grouped into one image; the split was "
                                               "converted one row per caption)")
    capped = load_retrieval_split(str(tmp_path / "test"), max_samples=2)  # --max-samples counts images
    assert capped.image_ids == [0, 1] and capped.rows_read == sum(len(c) for c in split.captions[:2])
    write_split(tmp_path / "per_image", [make_sample(i, 3, 16) for i in range(5)])
    assert load_retrieval_split(str(tmp_path / "per_image")).describe_grouping("x") == ""


def test_retrieval_refuses_ids_that_do_not_identify_images(tmp_path):
    rows = [make_sample(i, seed=3, image_size=16) for i in range(4)]
    for r in rows:
        r["image_id"] = 7  # e.g. a converter that wrote one id for everything
    write_split(tmp_path / "val", rows)
    with pytest.raises(RetrievalSplitError, match=r"rows 0 and 1 share image_id 7 but carry different captions"):
        load_retrieval_split(str(tmp_path / "val"))


def test_training_checks_its_retrieval_split_at_start(tmp_path, capsys):
    from blip_train.config import ConfigError, ExperimentConfig
    from blip_train.evaluation.in_training import check_eval_split

    write_split(tmp_path / "rows", per_caption_rows(3))
    rows = [make_sample(i, seed=3, image_size=16) for i in range(2)]
    write_split(tmp_path / "one_id", [dict(r, image_id=0) for r in rows])
    cfg = ExperimentConfig()
    cfg.model.arch, cfg.eval.interval, cfg.data.val = "stage1", 10, str(tmp_path / "rows")
    check_eval_split(cfg)  # grouped, and said once at start (not at every evaluation)
    assert "rows are 3 images" in capsys.readouterr().out
    cfg.data.val = str(tmp_path / "one_id")
    with pytest.raises(ConfigError, match="data.val: .* share image_id 0 but carry different captions"):
        check_eval_split(cfg)


def run_with_two_configs(tiny_assets, tmp_path) -> Path:
    """A run resumed once with another eval.k_test: step 1 saved under config.yaml, step 2 under config.1.yaml."""
    from tests.helpers.tiny_run import write_tiny_config

    run = tmp_path / "run"
    first = yaml.safe_load(write_tiny_config(tiny_assets, run).read_text())
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(first))
    (run / "config.1.yaml").write_text(yaml.safe_dump(dict(first, eval=dict(first["eval"], k_test=5))))
    for step, name in ((1, "config.yaml"), (2, "config.1.yaml")):
        tag = run / "checkpoints" / f"step_{step:07d}"
        tag.mkdir(parents=True)
        (tag / "complete.json").write_text(json.dumps({"step": step, "world_size": 1, "config_file": name,
                                                       "files": {}}))
    return run


def test_eval_rebuilds_the_model_from_the_config_its_checkpoint_was_saved_under(tiny_assets, tmp_path):
    from blip_train.eval import load_run_config

    run = run_with_two_configs(tiny_assets, tmp_path)
    cfg, _, tag = load_run_config(str(run), [])
    assert tag == "step_0000002" and cfg.eval.k_test == 5  # config.1.yaml, not config.yaml
    cfg, _, tag = load_run_config(str(run / "checkpoints" / "step_0000001"), [])
    assert tag == "step_0000001" and cfg.eval.k_test == 8


def zero_checkpoint(tag: Path, world: int) -> None:
    """Shard files as a ZeRO-3 bf16 run on `world` ranks writes them (small torch archives)."""
    tag.mkdir(parents=True)
    for r in range(world):
        torch.save({"w": torch.arange(4096.0)}, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"w": torch.arange(4096.0)}, tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    (tag / "complete.json").write_text(json.dumps({"world_size": world}))


def test_a_damaged_checkpoint_file_is_named(tmp_path):
    """Checkpoints written before files were listed in complete.json: DeepSpeed's per-rank files must all be
    there, and every torch file whole (its zip directory readable; deep: every entry's CRC-32)."""
    from blip_train.training.checkpoint import CheckpointError, require_whole_checkpoint, verify_checkpoint

    ckpt = tmp_path / "checkpoints"
    zero_checkpoint(ckpt / "step_0000002", 2)
    zero_checkpoint(ckpt / "step_0000004", 2)
    tag = ckpt / "step_0000004"
    assert verify_checkpoint(tag, deep=True) is None
    optim = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = optim.read_bytes()
    optim.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        require_whole_checkpoint(tag)
    assert str(e.value) == (f"checkpoint {tag} is damaged: {optim.name}: not a readable torch file "
                            f"({len(data) // 2:,d} bytes; File is not a zip file); the previous complete "
                            f"checkpoint is {ckpt / 'step_0000002'}")
    flipped = bytearray(data)
    at = data.index(np.arange(4096.0, dtype=np.float32)[1000:1002].tobytes())  # inside the tensor's bytes
    flipped[at] ^= 0xFF
    optim.write_bytes(bytes(flipped))
    assert verify_checkpoint(tag) is None  # sizes and zip directory fine: only reading every byte finds it
    assert verify_checkpoint(tag, deep=True) == f"{optim.name}: corrupt (entry {optim.stem}/data/0 fails its CRC-32 check)"
    optim.unlink()
    assert verify_checkpoint(tag) == f"{optim.name}: missing (1 of the 2 ranks' optim_states files are there)"
    for f in tag.glob("*_model_states.pt"):
        f.unlink()
    assert verify_checkpoint(tag) == "*_model_states.pt: missing (no such file in the checkpoint)"


def test_progress_bar_only_on_rank_0_and_only_when_asked(monkeypatch, capsys):
    list(distributed.progress_bar([1, 2, 3], "retrieval: images", True))
    assert "retrieval: images: 100%" in capsys.readouterr().err
    list(distributed.progress_bar([1, 2, 3], "retrieval: images", False))  # in training
    monkeypatch.setattr(distributed, "rank_world", lambda: (1, 2))
    assert list(distributed.progress_bar([1, 2, 3], "retrieval: images", True)) == [1, 2, 3]
    assert capsys.readouterr().err == ""


def test_retrieval_example_picture_and_generation_tables():
    from PIL import Image

    image = Image.fromarray(np.full((32, 32, 3), (200, 30, 30), np.uint8))
    top = [("a red square", True), ("a blue circle at left " * 6, False), ("x", False), ("y", False), ("z", True)]
    picture = render_retrieval_example(image, 17, top, rank=0)
    assert picture.shape == (CANVAS[1], CANVAS[0], 3) and picture.dtype == np.uint8
    assert (picture[8:168, 8:168] == (200, 30, 30)).all()  # the image, scaled to its panel
    text = picture[:, 176:]
    assert (text == 255).mean() > 0.8 and ((text[..., 1] > 100) & (text[..., 0] < 50)).any()  # green: a true one
    md = caption_table([{"image_id": 3, "prediction": "a | b", "references": ["r1", "r2"]}])
    assert md.splitlines() == ["| image_id | generated | references |", "|---|---|---|", "| 3 | a \\| b | r1 / r2 |"]
    md = vqa_table([{"question_id": 9, "image_id": 3, "question": "what\ncolor?", "prediction": "red",
                     "answers": ["red", "red", "dark red"]}])
    assert md.splitlines()[-1] == "| 9 | 3 | what color? | red | red (2), dark red |"


def test_metric_logger_writes_pictures_and_tables_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from blip_train.training.metrics import MetricLogger

    logger = MetricLogger(tmp_path, is_main=True, tensorboard=True, samples_per_step=1)
    picture = np.zeros((20, 30, 3), np.uint8)
    logger.log_examples(5, {"eval_examples/retrieval_0": picture, "eval_examples/vqa": "| a |\n|---|\n| b |"})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    (img,) = acc.Images("eval_examples/retrieval_0")
    assert (img.step, img.width, img.height) == (5, 30, 20)
    (text,) = acc.Tensors("eval_examples/vqa/text_summary")  # add_text appends /text_summary
    assert text.step == 5 and text.tensor_proto.string_val[0].decode() == "| a |\n|---|\n| b |"
    MetricLogger(tmp_path / "rank1", is_main=False, tensorboard=True, samples_per_step=1).log_examples(5, {"x": "y"})
    assert not (tmp_path / "rank1" / "tb").exists()
