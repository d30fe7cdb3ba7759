"""The ITC temperature stays in [0.001, 0.5] where it is trained and saved: on the optimizer's fp32
master weights, not only on the 16-bit working copy the model sees."""
from __future__ import annotations

import pytest
import torch

from blip_train.config import load_config
from blip_train.distributed.zero import gathered
from blip_train.models.stage1 import TEMP_MAX, TEMP_MIN
from blip_train.models.world import WorldInfo
from blip_train.training.checkpoint import TrainState
from blip_train.training.engine import build_engine
from blip_train.training.loop import train_step
from blip_train.training.metrics import MetricLogger
from blip_train.training.stages import build_stage
from tests.helpers.tiny_run import write_tiny_config


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_temperature_master_stays_in_range_with_a_large_lr(tiny_assets, tmp_path, zero_stage):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    out = tmp_path / "run"
    cfg = load_config(str(write_tiny_config(
        tiny_assets, out, optim={"lr": 2.0, "warmup_steps": 0, "grad_clip": 0.0},
        deepspeed={"config": "zero3_bf16" if zero_stage == 3 else "zero2", "zero_stage": zero_stage})))
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    engine, _ = build_engine(stage.model, cfg, 1, on_cuda=False)
    temp = engine.module.temp
    batches = iter(stage.build_train_loader())
    state, logger, seen = TrainState(), MetricLogger(out, True, False, 4), []
    for _ in range(4):
        train_step(engine, batches, cfg, state, logger)
        master = float(safe_get_full_fp32_param(temp))
        with gathered([temp]):
            working = float(temp.detach().float())
        seen.append(master)
        assert TEMP_MIN <= master <= TEMP_MAX and TEMP_MIN - 1e-5 <= working <= TEMP_MAX + 1e-5, (master, working)
    assert len(set(seen)) > 1 or seen[0] in (TEMP_MIN, TEMP_MAX)  # the lr really moved it
