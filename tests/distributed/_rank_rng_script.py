"""2-rank check of the training randomness: at every step, what a dropout mask and an ITM negative draw
would be on this rank (probed on a copy of the RNG state, so the run itself is unchanged).

usage: torchrun --nproc_per_node 2 tests/distributed/_rank_rng_script.py CONFIG.yaml REPORT.json
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from blip_train.config import load_config
from blip_train.models import stage1
from blip_train.models.stage1_losses import sample_hard_negatives
from blip_train.models.world import WorldInfo
from blip_train.training.loop import train

probes = []
_forward = stage1.Blip2Stage1.forward


def probed_forward(self, batch):
    state = torch.get_rng_state()
    dropped = (F.dropout(torch.ones(256), 0.5) == 0).nonzero().flatten().tolist()
    sims = torch.zeros(8, 8)  # equal similarities: the draw is the RNG's alone
    negatives = [t.tolist() for t in sample_hard_negatives(sims, sims, WorldInfo())]
    torch.set_rng_state(state)
    probes.append({"dropout": dropped, "negatives": negatives})
    return _forward(self, batch)


def main():
    stage1.Blip2Stage1.forward = probed_forward
    summary = train(load_config(sys.argv[1]))
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, probes)
    if dist.get_rank() == 0:
        json.dump({"ranks": out, "step": summary["step"]}, open(sys.argv[2], "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
