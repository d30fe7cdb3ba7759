"""Run under torchrun (2 ranks, gloo): stage-1 ITC loss, gradients and negative sampling per rank.

Each rank takes its half of a fixed global batch, computes the ITC loss with and without image ids,
backpropagates, draws ITM negatives, then runs the tiny Blip2Stage1 on its half of a model batch
(real gathers for ITC, ITM negatives and their gradients); it writes what it saw to
OUT_DIR/rank{r}.json, and the parent test compares with the 1-rank computation on the whole batch.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from blip_train.distributed.world import build_world_info
from blip_train.models.stage1_losses import itc_loss, sample_hard_negatives

GLOBAL_B, NQ, E = 6, 3, 5
IDS = [3, 1, 3, 2, 1, 4]  # duplicates within and across the two halves


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed global batch (float64, L2-normalised) that the parent test rebuilds too."""
    g = torch.Generator().manual_seed(2024)
    img = torch.randn(GLOBAL_B, NQ, E, generator=g, dtype=torch.float64)
    txt = torch.randn(GLOBAL_B, E, generator=g, dtype=torch.float64)
    return (img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True),
            torch.tensor(IDS))


def run_model(world, rank: int, size: int) -> dict:
    """Forward + backward of the tiny stage-1 model on this rank's half of `model_batch()`."""
    from tests.unit.test_stage1_model import make_batch, tiny_model_config
    from blip_train.models.stage1 import Blip2Stage1

    cfg = tiny_model_config()
    torch.manual_seed(0)  # same weights on every rank
    model = Blip2Stage1(cfg, world).train()
    torch.manual_seed(10 + rank)  # ranks draw different negatives, as in training
    full = make_batch(cfg, seed=3)
    b = full["text_ids"].shape[0] // size
    out = model({k: v[rank * b:(rank + 1) * b] for k, v in full.items()})
    out["loss"].backward()
    return {**{k: v.item() for k, v in out.items()},
            "ln_vision_grad": model.ln_vision.weight.grad.abs().sum().item()}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    world = build_world_info()  # the trainer's real all_gather implementations
    rank, size = dist.get_rank(), dist.get_world_size()
    b = GLOBAL_B // size
    img_all, txt_all, ids_all = global_batch()
    local = slice(rank * b, (rank + 1) * b)
    result: dict = {"rank": rank, "size": size}
    for name, ids in (("plain", None), ("ids", ids_all[local])):
        img = img_all[local].clone().requires_grad_(True)
        txt = txt_all[local].clone().requires_grad_(True)
        temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
        out = itc_loss(img, txt, temp, world, image_ids=ids)
        out.loss.backward()
        result[name] = {"loss": out.loss.item(), "img_grad": img.grad.tolist(),
                        "txt_grad": txt.grad.tolist(), "temp_grad": temp.grad.item()}

    out = itc_loss(img_all[local].float(), txt_all[local].float(), torch.tensor(0.07), world,
                   image_ids=ids_all[local])
    gen = torch.Generator().manual_seed(100 + rank)
    draws = [sample_hard_negatives(out.sim_i2t, out.sim_t2i, world, image_ids=ids_all[local], generator=gen)
             for _ in range(200)]
    result["neg_image_idx"] = [d[0].tolist() for d in draws]
    result["neg_text_idx"] = [d[1].tolist() for d in draws]
    result["model"] = run_model(world, rank, size)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
