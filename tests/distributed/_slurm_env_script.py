"""One fake `srun` task: map the SLURM variables, export them, form the gloo group, all-reduce.

Run as `python _slurm_env_script.py OUT_DIR` with SLURM_* variables and no RANK/WORLD_SIZE set.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from blip_train.distributed import destroy_distributed, discover_environment, export_environment, init_distributed


def main(out_dir: Path) -> None:
    env = discover_environment()
    export_environment(env)
    init_distributed(env, timeout_minutes=2)
    t = torch.tensor([env.rank + 1.0])
    dist.all_reduce(t)
    out = {"env": dataclasses.asdict(env), "sum": t.item(), "backend": dist.get_backend(),
           "dist_rank": dist.get_rank(), "dist_world": dist.get_world_size(),
           "exported": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                    "MASTER_ADDR", "MASTER_PORT")}}
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(out))
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
