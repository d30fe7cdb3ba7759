"""One of several jobs that start together on one machine (tests/distributed/test_data_dist.py): build the
train loader of a split ROUNDS times, keeping every one alive (each holds its own streaming segments), and
read one batch of each.

usage: torchrun --nproc_per_node 2 tests/distributed/_shm_race_script.py --data SPLIT --rounds N --go FILE
Prints "built N loaders" on rank 0.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch.distributed as dist

from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.datasets import build_train_loader


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--go", required=True, help="a file to wait for: every job starts building at once")
    args = p.parse_args()
    dist.init_process_group("gloo")
    while not Path(args.go).exists():
        time.sleep(0.01)
    cfg = DataConfig(train=[StreamConfig(local=args.data)], image_size=16, num_workers=0)
    loaders = []
    for _ in range(args.rounds):
        loaders.append(build_train_loader(cfg, 2))
        next(iter(loaders[-1]))
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"built {len(loaders)} loaders", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
