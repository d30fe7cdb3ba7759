"""Optional Weights & Biases logging (run.wandb): every scalar goes to W&B too, a resumed run continues the
same W&B run, and asking for it without the package is refused at config time. Offline: no network."""
from __future__ import annotations

import importlib.util

import pytest

from blip_train.config import ConfigError, load_config
from blip_train.training.metrics import MetricLogger, start_wandb

wandb = pytest.importorskip("wandb")  # part of the dev extras: installed by `make setup`


def test_scalars_reach_wandb_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = start_wandb(tmp_path, "blip-train-tests", {"optim": {"lr": 1e-4}})
    logger = MetricLogger(tmp_path, True, False, 4, wandb_run=run)
    logger.log_scalars(1, {"train/loss": 2.5, "train/lr": 1e-4})
    logger.log_scalars(2, {"train/loss": 2.0})
    logger.log_scalars(2, {"eval/img_r1": 12.5})  # evaluation at the same step joins that step
    logger.log_scalars(3, {"train/loss": 1.5})  # W&B commits a step when the next one starts
    assert run.summary["train/loss"] == 2.0 and run.summary["eval/img_r1"] == 12.5
    assert run.config["optim"]["lr"] == 1e-4
    first_id = run.id
    logger.close()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{first_id}"))  # written locally, nothing sent
    again = start_wandb(tmp_path, "blip-train-tests", {})
    assert again.id == first_id
    again.finish()


def test_wandb_without_the_package_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"run.wandb: the wandb package is not installed"):
        load_config(None, ["run.wandb=true"])
