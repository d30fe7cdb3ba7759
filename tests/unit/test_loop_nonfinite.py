"""The loop's step: a non-finite micro-batch is skipped (no update), N in a row abort with a clear message
(ZeRO-2 and ZeRO-3); the lr follows the step counter even when DeepSpeed skips a step."""
from __future__ import annotations

import itertools

import pytest
import torch

from blip_train.config import load_config
from blip_train.distributed.zero import gathered
from blip_train.training.checkpoint import TrainState
from blip_train.training.engine import build_engine
from blip_train.training.loop import NonFiniteLossError, train_step
from blip_train.training.metrics import MetricLogger
from blip_train.training.stages import build_stage
from blip_train.models.world import WorldInfo
from tests.helpers.tiny_run import write_tiny_config


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def engine_and_batches(request, tiny_assets, tmp_path_factory):
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    out = tmp_path_factory.mktemp("nonfinite") / "run"
    template = "zero3_bf16" if request.param == 3 else "zero2"
    cfg = load_config(str(write_tiny_config(tiny_assets, out,
                                            deepspeed={"config": template, "zero_stage": request.param},
                                            train={"max_bad_steps": 3}, optim={"warmup_steps": 0})))
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    engine, _ = build_engine(stage.model, cfg, 1, on_cuda=False)
    batch = next(iter(stage.build_train_loader()))
    return cfg, engine, batch, out


def _poisoned(batch):
    bad = dict(batch)
    bad["pixel_values"] = torch.full(batch["pixel_values"].shape, float("nan"))  # normalised floats pass through
    return bad


def _weights(engine):
    with gathered(list(engine.module.parameters())):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def test_nan_batch_is_skipped_without_an_update(engine_and_batches):
    cfg, engine, batch, out = engine_and_batches
    logger = MetricLogger(out, True, False, 4)
    state = TrainState()
    before = _weights(engine)
    # one poisoned micro-batch, then a good one: the step happens once, on the good batch only
    train_step(engine, iter([_poisoned(batch), batch]), cfg, state, logger)
    assert state.step == 1 and state.bad_steps_total == 1
    after = _weights(engine)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_consecutive_nans_abort_with_clear_message(engine_and_batches):
    cfg, engine, batch, out = engine_and_batches
    logger = MetricLogger(out, True, False, 4)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        train_step(engine, itertools.repeat(_poisoned(batch)), cfg, TrainState(), logger)


def test_lr_follows_the_step_counter_when_deepspeed_skips_a_step(tiny_assets, tmp_path):
    """DeepSpeed skips its scheduler on an fp16 overflow step; the lr must not fall behind the step count."""
    import deepspeed

    from blip_train.training.engine import lr_at
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    out = tmp_path / "run"
    cfg = load_config(str(write_tiny_config(tiny_assets, out, deepspeed={"config": "zero2", "zero_stage": 2},
                                            optim={"warmup_steps": 10, "lr": 1e-3}, train={"max_steps": 20})))
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    engine, _ = build_engine(stage.model, cfg, 1, on_cuda=False)
    opt = engine.optimizer
    real_step, used = opt.step, []

    def step_with_overflow(*args, **kwargs):  # what an fp16 loss-scale overflow looks like to the engine
        used.append(opt.param_groups[0]["lr"])
        real_step(*args, **kwargs)
        opt.overflow = len(used) == 2

    opt.step = step_with_overflow
    state, logger, batches = TrainState(), MetricLogger(out, True, False, 4), iter(stage.build_train_loader())
    for _ in range(4):
        train_step(engine, batches, cfg, state, logger)
    assert engine.skipped_steps == 1  # DeepSpeed did see an overflow
    assert used == pytest.approx([lr_at(k, cfg) for k in range(4)], rel=1e-6)
