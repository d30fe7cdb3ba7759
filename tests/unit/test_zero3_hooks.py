"""ZeRO-3 sees every tensor a wrapped module returns, so its backward hooks (fetch and release of the
parameters) are attached: no module of ours returns a type DeepSpeed cannot traverse."""
from __future__ import annotations

import torch

from blip_train.config import load_config
from blip_train.data.device import finish_batch
from blip_train.models.world import WorldInfo
from blip_train.training.engine import build_engine
from blip_train.training.stages import build_stage
from tests.helpers.tiny_run import write_tiny_config


def test_zero3_forward_backward_sees_every_module_output(tiny_assets, tmp_path, monkeypatch):
    import deepspeed
    import deepspeed.runtime.zero.utils as zero_utils

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(str(write_tiny_config(tiny_assets, tmp_path / "run", optim={"warmup_steps": 0})))
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    engine, _ = build_engine(stage.model, cfg, 1, on_cuda=False)
    warnings: list[str] = []
    monkeypatch.setattr(zero_utils, "warned", False)  # DeepSpeed warns once per process
    monkeypatch.setattr(zero_utils.logger, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    losses = engine(finish_batch(next(iter(stage.build_train_loader()))))
    engine.backward(losses["loss"])
    engine.step()
    assert not [w for w in warnings if "unknown inputs or outputs type" in w], warnings
