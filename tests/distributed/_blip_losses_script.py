"""Run under torchrun (2 ranks, gloo): ALBEF/BLIP momentum ITC with a shared feature queue.

For two steps, each rank takes its half of a fixed global batch, computes the momentum ITC loss
(with and without image ids) against the queue, the ITM similarities over the global batch, then
gathers the momentum features and ids with the trainer's real gather and enqueues them. It writes
what it saw to OUT_DIR/rank{r}.json; the parent test compares with float64 loops and with a
1-rank queue that enqueued each whole global batch.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from blip_train.distributed.world import build_world_info
from blip_train.models.blip_losses import FeatureQueue, global_sims, momentum_itc_loss, sample_hard_negatives

GLOBAL_B, E, Q, STEPS = 6, 4, 12, 2
TEMP, ALPHA = 0.07, 0.4


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The fixed global batch of `step` (float64, L2-normalised), rebuilt by the parent test too."""
    g = torch.Generator().manual_seed(100 + step)
    feats = {k: torch.randn(GLOBAL_B, E, generator=g, dtype=torch.float64) for k in ("img", "txt", "img_m", "txt_m")}
    batch = {k: v / v.norm(dim=-1, keepdim=True) for k, v in feats.items()}
    batch["ids"] = torch.randint(0, 5, (GLOBAL_B,), generator=g)  # repeats within and across halves
    return batch


def new_queue() -> FeatureQueue:
    """The same initial queue on every rank (and in the parent), as the trainer's seeded init gives."""
    return FeatureQueue(E, Q, with_idx=True, generator=torch.Generator().manual_seed(7)).double()


def queue_state(queue: FeatureQueue) -> dict[str, list]:
    return {k: v.tolist() for k, v in queue.state_dict().items()}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    world = build_world_info()  # the trainer's real all_gather implementations
    rank, size = dist.get_rank(), dist.get_world_size()
    b = GLOBAL_B // size
    local = slice(rank * b, (rank + 1) * b)
    queue = new_queue()
    steps = []
    for step in range(STEPS):
        x = {k: v[local] for k, v in global_batch(step).items()}
        plain = momentum_itc_loss(x["img"], x["txt"], x["img_m"], x["txt_m"], queue, TEMP, ALPHA)
        with_ids = momentum_itc_loss(x["img"], x["txt"], x["img_m"], x["txt_m"], queue, TEMP, ALPHA, idx=x["ids"])
        sim_i2t, sim_t2i = global_sims(x["img"], x["txt"], TEMP, world)
        neg_image, neg_text = sample_hard_negatives(sim_i2t, sim_t2i, world, image_ids=x["ids"],
                                                    generator=torch.Generator().manual_seed(rank))
        queue.enqueue_(world.gather(x["img_m"]), world.gather(x["txt_m"]), world.gather(x["ids"]))
        steps.append({"loss_plain": plain.loss.item(), "loss_ids": with_ids.loss.item(),
                      "sim_i2t": sim_i2t.tolist(), "sim_t2i": sim_t2i.tolist(),
                      "neg_image": neg_image.tolist(), "neg_text": neg_text.tolist(),
                      "queue": queue_state(queue)})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "size": size, "steps": steps}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
