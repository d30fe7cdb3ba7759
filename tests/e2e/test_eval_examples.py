"""What TensorBoard shows at each in-training evaluation, read back from a tiny 1-rank run's event files:
retrieval examples as pictures (stage 1), generated answers beside the human ones as a table (InstructBLIP)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_train.evaluation.examples import CANVAS, EXAMPLE_IMAGES
from tests.helpers.tiny_run import run_train, write_tiny_config

pytestmark = pytest.mark.e2e


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_retrieval_examples_are_pictures_in_tensorboard(tiny_assets, tmp_path):
    run = tmp_path / "stage1"
    run_train(write_tiny_config(tiny_assets, run, run={"tensorboard": True}, train={"max_steps": 4, "save_interval": 4},
                                eval={"interval": 2, "k_test": 8, "batch_size": 8, "max_samples": 10}), nproc=1)
    acc = events(run)
    tags = [f"eval_examples/retrieval_{i}" for i in range(EXAMPLE_IMAGES)]
    assert sorted(acc.Tags()["images"]) == tags
    for tag in tags:
        shots = acc.Images(tag)
        assert [s.step for s in shots] == [2, 4]  # at each evaluation, beside its scalars
        for s in shots:
            picture = np.asarray(Image.open(io.BytesIO(s.encoded_image_string)).convert("RGB"))
            assert (s.width, s.height) == CANVAS and picture.shape == (CANVAS[1], CANVAS[0], 3)
            image, text = picture[8:168, 8:168], picture[:, 176:]
            assert image.std() > 5  # a synthetic scene, not a blank panel
            assert 0.5 < (text == 255).all(-1).mean() < 0.995  # captions drawn on white
    assert [e.step for e in acc.Scalars("eval/txt_r1")] == [2, 4]


def test_generated_answers_are_a_table_in_tensorboard(tiny_assets, tmp_path):
    from tests.distributed.test_export_generative import llm_folder

    llm = {"path": str(llm_folder(tiny_assets, "opt")), "dtype": "bf16", "max_txt_len": 12, "max_prompt_len": 16}
    run = tmp_path / "instruct"
    run_train(write_tiny_config(tiny_assets, run, run={"tensorboard": True}, model={"arch": "instruct", "llm": llm},
                                train={"max_steps": 2, "save_interval": 2},
                                eval={"interval": 2, "max_samples": 3, "batch_size": 3, "num_beams": 1,
                                      "max_new_tokens": 4}), nproc=1)
    acc = events(run)
    (entry,) = acc.Tensors("eval_examples/vqa/text_summary")  # add_text's tag
    table = entry.tensor_proto.string_val[0].decode().splitlines()
    assert entry.step == 2
    assert table[0] == "| question_id | image_id | question | generated | human answers |"
    assert len(table) == 2 + 3 and all(line.count(" | ") == 4 for line in table[2:])
