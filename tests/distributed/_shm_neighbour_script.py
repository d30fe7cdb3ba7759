"""One of two jobs sharing a machine (tests/distributed/test_data_dist.py): build the train loader (optionally as a
resumed job does: read some batches, save the position, restore it into a new loader), say so, then read
the rest of the epoch, each step possibly waiting for the neighbour job.

usage: torchrun --nproc_per_node 2 tests/distributed/_shm_neighbour_script.py --data SPLIT --out DIR --ready FILE
           [--resume-after N] [--build-after FILE] [--read-after FILE]
Writes DIR/rank<R>.json with the image ids this rank read (before and after the resume).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch.distributed as dist

from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.datasets import build_train_loader


def wait_for(path: Path, timeout: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ready", required=True, help="written once this job's loader exists")
    p.add_argument("--build-after", default=None, help="a file to wait for before building the loader")
    p.add_argument("--read-after", default=None, help="a file to wait for before reading")
    p.add_argument("--resume-after", type=int, default=0, help="batches read before saving and restoring the position")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.build_after:
        wait_for(Path(args.build_after))
    cfg = DataConfig(train=[StreamConfig(local=args.data)], image_size=16, num_workers=1)
    loader, ids = build_train_loader(cfg, 4), []
    if args.resume_after:
        for batch in loader:
            ids += batch["image_id"].tolist()
            if len(ids) == 4 * args.resume_after:
                break
        state = loader.state_dict()
        del loader
        gc.collect()
        loader = build_train_loader(cfg, 4)
        loader.load_state_dict(state)  # the position waits in shared memory for the first iteration
    dist.barrier()
    if rank == 0:
        Path(args.ready).write_text("built")
    if args.read_after:
        wait_for(Path(args.read_after))
    ids += [i for batch in loader for i in batch["image_id"].tolist()]
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(ids, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
