"""Run by tests/distributed/test_data_dist.py under torchrun: one epoch, a partial epoch + state, a resume.

Writes <out>/rank<R>.json with the image ids each phase saw on this rank.
"""
from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.datasets import build_train_loader


def ids(loader, max_batches=None):
    out = []
    for i, batch in enumerate(loader):
        out += batch["image_id"].tolist()
        if max_batches is not None and i + 1 == max_batches:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=int, default=2, help="batches before the mid-epoch checkpoint")
    args = p.parse_args()
    os.environ.pop("LOCAL_WORLD_SIZE", None)  # torchrun sets it; the builder must cope without
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = DataConfig(train=[StreamConfig(local=args.data)], image_size=16, num_workers=1)
    full = ids(build_train_loader(cfg, 4))
    first = build_train_loader(cfg, 4)
    part = ids(first, args.batches)
    state = first.state_dict()
    del first
    resumed = build_train_loader(cfg, 4)
    resumed.load_state_dict(state)
    rest = ids(resumed)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"full": full, "part": part, "rest": rest, "state": state,
                   "local_world_size": os.environ.get("LOCAL_WORLD_SIZE")}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
