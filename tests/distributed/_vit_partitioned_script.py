"""Run under torchrun (2 ranks, gloo): build stage 1 with the run's ZeRO-3 config, so the frozen ViT is
partitioned as it is built (and loaded partition by partition), and save what each rank holds.

argv: OUT_DIR PRECISION WEIGHTS ('' for a random tower). Writes OUT_DIR/rank{r}.pt: per ViT parameter its
local partition size and dtype, the gathered ViT and the trainable parameters' values.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from blip_train.config.schema import ExperimentConfig
from blip_train.distributed import (destroy_distributed, discover_environment, gathered, init_distributed,
                                    is_zero3_param)
from blip_train.training.stages import build_stage1_model
from tests.helpers.tiny import tiny_model_config, tiny_vision_config

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def experiment(precision: str, weights: str, tokenizer: str) -> ExperimentConfig:
    model = tiny_model_config(vision=tiny_vision_config(precision=precision, weights=weights))
    model.qformer.tokenizer = tokenizer
    return replace(ExperimentConfig(), model=model)


def main() -> None:
    out, precision, weights, tokenizer = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    env = discover_environment()
    init_distributed(env, timeout_minutes=5, on_cuda=False)
    model, _ = build_stage1_model(experiment(precision, weights, tokenizer), device_type="cpu", ds_config=ZERO3)
    vit = model.visual_encoder
    held = {n: (is_zero3_param(p), int(p.ds_tensor.numel()) if is_zero3_param(p) else p.numel(),
                str(p.dtype), p.requires_grad) for n, p in vit.named_parameters()}
    with gathered(vit):
        full = {n: p.detach().clone() for n, p in vit.named_parameters()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"held": held, "vit": full, "trainable": trainable}, out / f"rank{env.rank}.pt")
    destroy_distributed()


if __name__ == "__main__":
    main()
