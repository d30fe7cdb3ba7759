"""Dtypes under the engine are the config's, not DeepSpeed's.

deepspeed.initialize casts every parameter of a model to the engine's 16-bit dtype unless the model
arrives partitioned. The engine builder decides instead: trainable parameters take
`deepspeed.precision`; the frozen ViT keeps `model.vision.precision` and the frozen LLM
`model.llm.dtype` (an fp32 FlanT5 beside a bf16 Q-Former), bit for bit equal to their sources, under
ZeRO-2 (not partitioned) and ZeRO-3 (partitioned; the LLM loaded straight into partitions).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from blip_train.config import load_config
from blip_train.data.device import finish_batch
from blip_train.distributed.zero import gathered, hf_zero3_loading, with_precision
from blip_train.models.world import WorldInfo
from blip_train.training.engine import build_ds_config, build_engine, cast_trainable_
from blip_train.training.stages import build_stage
from tests.distributed.test_export_generative import llm_folder
from tests.helpers.tiny_run import VISION, write_tiny_config


def _engine(tiny_assets, tmp_path, zero_stage: int, vision_precision: str, llm: dict | None = None):
    """In-process 1-rank bf16 engine; with `llm`, a stage-2 model around it."""
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    model = {"vision": dict(VISION, weights=str(tiny_assets / "vit.safetensors"), precision=vision_precision)}
    if llm is not None:
        model.update(arch="stage2", llm=llm)
    template = "zero3_bf16" if zero_stage == 3 else "zero2"
    cfg = load_config(str(write_tiny_config(tiny_assets, tmp_path / f"z{zero_stage}", model=model,
                                            deepspeed={"config": template, "zero_stage": zero_stage},
                                            optim={"warmup_steps": 0})))
    ds = build_ds_config(cfg, 1, on_cuda=False)
    # as the training loop does: the LLM loads into partitions, in its own dtype
    keep = hf_zero3_loading(ds, llm is not None, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[
        cfg.model.llm.dtype])
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    engine, _ = build_engine(stage.model, cfg, 1, on_cuda=False, ds_config=ds)
    del keep
    return engine, stage


def _full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    with gathered(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_one_step(engine, stage) -> tuple[float, list[bool], list[bool]]:
    """Loss of one step, and per trainable / frozen parameter whether the step changed it (gathered)."""
    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with gathered(trainable + frozen):
        before = {id(p): p.detach().clone() for p in trainable + frozen}
    loss = engine(finish_batch(next(iter(stage.build_train_loader()))))["loss"]
    engine.backward(loss)
    engine.step()
    with gathered(trainable + frozen):
        changed = {id(p): not torch.equal(before[id(p)], p.detach()) for p in trainable + frozen}
    return float(loss.detach()), [changed[id(p)] for p in trainable], [changed[id(p)] for p in frozen]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_fp32_frozen_vit_survives_a_bf16_engine(tiny_assets, tmp_path, zero_stage):
    engine, stage = _engine(tiny_assets, tmp_path, zero_stage, "fp32")
    model = engine.module
    assert {p.dtype for p in model.visual_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert all(hasattr(p, "ds_id") for p in model.parameters()) == (zero_stage == 3)
    source = load_file(str(tiny_assets / "vit.safetensors"))
    vit = _full_state(model.visual_encoder)
    assert vit.keys() == source.keys()
    for name, value in source.items():
        assert torch.equal(vit[name], value), name  # never rounded through bf16
    loss, trainable_changed, frozen_changed = _train_one_step(engine, stage)
    assert torch.isfinite(torch.tensor(loss))
    assert any(trainable_changed) and not any(frozen_changed)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_fp32_frozen_t5_beside_a_bf16_qformer(tiny_assets, tmp_path, zero_stage):
    from transformers import AutoModelForSeq2SeqLM

    folder = llm_folder(tiny_assets, "t5")
    llm = {"path": str(folder), "dtype": "fp32", "max_txt_len": 12, "max_prompt_len": 16}
    engine, stage = _engine(tiny_assets, tmp_path, zero_stage, "bf16", llm)
    model = engine.module
    assert {p.dtype for p in model.llm.parameters()} == {torch.float32}
    assert {p.dtype for p in model.visual_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    if zero_stage == 3:  # loaded into partitions, not cast afterwards
        assert all(hasattr(p, "ds_id") for p in model.parameters())
    reference = AutoModelForSeq2SeqLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()
    ours = _full_state(model.llm)
    for name, value in ours.items():
        assert torch.equal(value, reference[name]), name
    loss, trainable_changed, frozen_changed = _train_one_step(engine, stage)
    assert torch.isfinite(torch.tensor(loss))
    assert any(trainable_changed) and not any(frozen_changed)


def test_with_precision_rewrites_only_the_switches():
    ds = {"bf16": {"enabled": True}, "fp16": {"enabled": False, "loss_scale": 0}, "zero_optimization": {"stage": 3}}
    fp32 = with_precision(ds, torch.float32)
    assert fp32["bf16"]["enabled"] is False and fp32["fp16"] == {"enabled": False, "loss_scale": 0}
    assert with_precision(ds, torch.float16)["fp16"]["enabled"] is True
    assert ds["bf16"]["enabled"] is True  # the run's own config is untouched
    assert fp32["zero_optimization"] is ds["zero_optimization"]


def test_a_trainable_parameter_partitioned_in_the_wrong_dtype_is_refused():
    p = torch.nn.Parameter(torch.zeros(0))
    p.ds_id = 7  # what zero.Init leaves on a partitioned parameter
    module = torch.nn.Module()
    module.w = p
    with pytest.raises(RuntimeError, match="w: trainable but partitioned in torch.float32"):
        cast_trainable_(module, torch.bfloat16)
