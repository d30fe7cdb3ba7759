"""`python -m blip_train.train` run through `train()` (resume included), then every parameter the live engine
holds when the run ends, gathered, written by rank 0 to OUT.pt as {"trainable": {...}, "frozen": {...}}.

usage: torchrun --nproc_per_node N tests/distributed/_train_dump_script.py OUT.pt --config CONFIG [--set KEY=VALUE ...]
"""
import sys

import torch
import torch.distributed as dist

from blip_train.config import load_config
from blip_train.distributed.zero import gathered
from blip_train.train import parse_args
from blip_train.training.loop import train


def main():
    out, args = sys.argv[1], parse_args(sys.argv[2:])
    engine = train(load_config(args.config, args.overrides))["engine"]
    params = list(engine.module.named_parameters())
    with gathered([p for _, p in params]):
        live = {"trainable": {n: p.detach().clone() for n, p in params if p.requires_grad},
                "frozen": {n: p.detach().clone() for n, p in params if not p.requires_grad}}
    if dist.get_rank() == 0:
        torch.save(live, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
