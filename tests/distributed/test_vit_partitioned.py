"""ZeRO-3 builds the frozen ViT partitioned, in its final dtype, and loads it partition by partition: no
rank holds the whole tower (ViT-g is 4 GB of fp32), and the model is the one a whole build gives."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from blip_train.data.tokenizers import train_wordpiece_tokenizer
from blip_train.models.eva_vit import EVAViT
from blip_train.training.stages import build_stage1_model
from tests.conftest import torchrun
from tests.distributed._vit_partitioned_script import experiment
from tests.helpers.tiny import tiny_vision_config

SCRIPT = Path(__file__).with_name("_vit_partitioned_script.py")


def write_weights(path: Path, image_size: int) -> None:
    torch.manual_seed(123)
    sd = EVAViT(tiny_vision_config(image_size=image_size)).state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:  # a LAVIS-style .pth in fp16, wrapped in "model"
        torch.save({"model": {k: v.half() for k, v in sd.items()}}, path)


@pytest.mark.dist
@pytest.mark.parametrize("case", ["random_fp32", "pth_bf16", "safetensors_interpolated"])
def test_frozen_vit_is_built_partitioned_and_equals_a_whole_build(tmp_path: Path, case: str) -> None:
    tok = tmp_path / "tok"
    train_wordpiece_tokenizer(["a red square", "two blue circles on the left"] * 10, vocab_size=100, out_dir=tok)
    precision, weights = "fp32", ""
    if case == "pth_bf16":
        precision, weights = "bf16", tmp_path / "vit.pth"
        write_weights(weights, image_size=32)
    elif case == "safetensors_interpolated":  # trained at 48 px (6x6 grid), built at 32 px (4x4)
        weights = tmp_path / "vit.safetensors"
        write_weights(weights, image_size=48)
    proc = torchrun([str(SCRIPT), str(tmp_path), precision, str(weights), str(tok)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    whole, _ = build_stage1_model(experiment(precision, str(weights), str(tok)), device_type="cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    for name, p in whole.visual_encoder.named_parameters():
        for r in ranks:
            partitioned, local, held_dtype, requires_grad = r["held"][name]
            assert partitioned and not requires_grad, name
            assert local == math.ceil(p.numel() / 2), (name, local, p.numel())  # each rank holds half
            assert held_dtype == str(dtype), name
            torch.testing.assert_close(r["vit"][name], p.detach(), rtol=0, atol=0, msg=name)
    # The trainable parts' init continues the same random stream as in a whole build.
    expected = {n: p.detach() for n, p in whole.named_parameters() if p.requires_grad}
    for r in ranks:
        assert set(r["trainable"]) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(r["trainable"][name], value, rtol=0, atol=0, msg=name)
