"""Fine-tuning through the real trainer (2 ranks, ZeRO-3), stage 2 with OPT:
- LoRA: checkpoints carry the adapters with the Q-Former side but never the frozen base LLM, a resume from
  step 2 redoes the uninterrupted run's steps 3-4 exactly, and the live frozen base weights are their source
  bit for bit;
- a training ViT with drop path (per-rank RNG, restored on resume), activation checkpointing and layer-wise
  lr decay: checkpoints carry the ViT, and the resume is exact as well."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers.tiny_run import config_with_output_dir, read_losses, train_and_dump, trainable_weights
from tests.distributed.test_finetune_zero3 import _finetune_config

pytestmark = pytest.mark.dist
LORA = {"lora": {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "fc1"]}}


def _source_llm(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return {f"llm.{k}": v.detach() for k, v in llm.named_parameters()}


def _resume_exactly(config, full, tmp_path, sets) -> None:
    """Resume a copy of `full`'s step-2 checkpoint: steps 3-4 equal the uninterrupted run's losses and weights."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002")
    r = train_and_dump(config_with_output_dir(config, resumed), tmp_path / "resumed.pt", *sets)
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    a, b = read_losses(full), read_losses(resumed)
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in (3, 4)), (a, b)
    wa, wb = trainable_weights(full, "step_0000004"), trainable_weights(resumed, "step_0000004")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_vit_checkpoint_and_exact_resume(tiny_assets, tmp_path):
    full = tmp_path / "full"
    vision = {"frozen": False, "drop_path_rate": 0.3, "grad_checkpointing": True}
    config = _finetune_config(tiny_assets, full, vision, {}, {"layer_decay": 0.7})
    sets = ("train.max_steps=4", "train.save_interval=2")
    train_and_dump(config, tmp_path / "full.pt", *sets)
    w2 = trainable_weights(full, "step_0000002")
    vit = [k for k in w2 if k.startswith("visual_encoder.")]
    assert "visual_encoder.pos_embed" in vit and any(k.startswith("visual_encoder.blocks.1.") for k in vit)
    meta = json.loads((full / "checkpoints" / "step_0000002" / "complete.json").read_text())
    assert set(meta["frozen"]) == {"llm"}  # the ViT is trained state now, not a frozen tower
    _resume_exactly(config, full, tmp_path, sets)


def test_lora_checkpoint_and_exact_resume(tiny_assets, tmp_path):
    from blip_train.config import load_config
    from blip_train.models.lora import base_name

    full = tmp_path / "full"
    config = _finetune_config(tiny_assets, full, {}, LORA, {})
    sets = ("train.max_steps=4", "train.save_interval=2")
    train_and_dump(config, tmp_path / "full.pt", *sets)
    live = torch.load(tmp_path / "full.pt", weights_only=True)
    adapters = [k for k in live["trainable"] if ".lora_" in k]
    assert len(adapters) == 2 * 3 * 2  # 2 layers x 3 targets x (A, B)
    assert all(live["trainable"][k].abs().sum() > 0 for k in adapters if ".lora_B." in k)  # B left zero

    # The checkpoint: adapters in, base LLM out (complete.json records what was left out).
    w2 = trainable_weights(full, "step_0000002")
    assert set(adapters) <= set(w2) and not any(k.startswith("llm.") and ".lora_" not in k for k in w2)
    meta = json.loads((full / "checkpoints" / "step_0000002" / "complete.json").read_text())
    source = _source_llm(load_config(str(config)).model.llm.path)
    assert meta["frozen"]["llm"]["numel"] == sum(v.numel() for v in source.values())

    _resume_exactly(config, full, tmp_path, sets)
    wa = trainable_weights(full, "step_0000004")
    assert set(adapters) <= set(wa)

    # The frozen base, never checkpointed, is its source bit for bit in both runs.
    for dump in (live, torch.load(tmp_path / "resumed.pt", weights_only=True)):
        frozen_llm = {base_name(k): v for k, v in dump["frozen"].items() if k.startswith("llm.")}
        assert frozen_llm.keys() == source.keys()
        assert all(torch.equal(frozen_llm[k], v) for k, v in source.items())
