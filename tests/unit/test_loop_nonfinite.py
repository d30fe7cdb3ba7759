"""Non-finite losses: a bad micro-batch is skipped (no update), N in a row abort with a clear message."""
from __future__ import annotations

import itertools

import pytest
import torch

from blip_train.config import load_config
from blip_train.dist.zero import gathered
from blip_train.training.checkpoint import TrainState
from blip_train.training.engine import build_engine
from blip_train.training.loop import NonFiniteLossError, train_step
from blip_train.training.metrics import MetricLogger
from blip_train.training.stages import build_stage
from blip_train.models.world import WorldInfo
from tests.helpers.tiny_run import write_tiny_config


@pytest.fixture(scope="module")
def engine_and_batches(tiny_assets, tmp_path_factory):
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    out = tmp_path_factory.mktemp("nonfinite") / "run"
    cfg = load_config(str(write_tiny_config(tiny_assets, out, deepspeed={"config": "zero2", "zero_stage": 2},
                                            train={"max_bad_steps": 3}, optim={"warmup_steps": 0})))
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    engine, _, _, _ = build_engine(stage.model, cfg, 1, on_cuda=False)
    batch = next(iter(stage.build_train_loader()))
    return cfg, engine, batch, out


def _poisoned(batch):
    bad = dict(batch)
    bad["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
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
