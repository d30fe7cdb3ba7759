"""The image ids each rank reads in two epochs of the training loader, with the default data config.

Run on 2 ranks under any launcher (torchrun, srun): rank 0 writes OUT as {"ranks": [[batch, ...] per rank],
"nodes": [SLURMD_NODENAME or host, per rank], "envs": [what blip_train/distributed/env.py made of the
launcher's variables, per rank], "physical_nodes": what streaming counts}.

usage: _data_order_script.py SPLIT OUT
"""
import dataclasses
import json
import os
import socket
import sys

import torch.distributed as dist

from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.datasets import build_train_loader
from blip_train.distributed.env import discover_environment, export_environment


def main() -> None:
    split, out = sys.argv[1], sys.argv[2]
    env = discover_environment()
    export_environment(env)  # RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_*: what streaming reads
    dist.init_process_group("gloo")
    loader = build_train_loader(DataConfig(train=[StreamConfig(local=split)], image_size=32, num_workers=1), 4)
    batches = [batch["image_id"].tolist() for _ in range(2) for batch in loader]
    mine = {"batches": batches, "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            "env": dataclasses.asdict(env)}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"ranks": [r["batches"] for r in every], "nodes": [r["node"] for r in every],
                       "envs": [r["env"] for r in every], "physical_nodes": env.num_nodes}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
