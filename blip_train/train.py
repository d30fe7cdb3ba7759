"""Training entry point.

    python -m blip_train.train --config demo/stage1 [--set train.max_steps=100 ...]
    torchrun --nproc_per_node 8 -m blip_train.train --config blip2_stage1_vitg
    deepspeed --num_gpus 8 --module blip_train.train --config blip2_stage2_opt2.7b
    srun python -m blip_train.train --config ...        (ranks from SLURM_PROCID / SLURM_NTASKS)

The config is validated before any process group is created; the run resumes automatically from the
newest complete checkpoint in run.output_dir.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from blip_train.config import ConfigError, check_input_paths, check_output_dir, load_config
from blip_train.distributed.env import discover_environment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m blip_train.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML path or recipe name under blip_train/recipes (e.g. demo/stage1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run even though the config changes what it means (optimizer, schedule, batch, "
                        "data, model); the new config is kept beside the old one")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_input_paths(cfg)  # seconds, before the heavy imports below
        fresh = not Path(cfg.run.output_dir).exists()
        check_output_dir(cfg.run.output_dir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import warnings
    # DeepSpeed's ZeRO reduce path calls a torch API that warns on every step; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor).*deprecated")
    from blip_train.training.loop import train  # heavy imports only after the config is known good
    try:
        train(cfg, allow_config_change=args.allow_config_change)
    except ConfigError as e:  # settings that need the world size (batch arithmetic, templates, paths)
        print(f"config error: {e}", file=sys.stderr)
        saved = Path(cfg.run.output_dir, "checkpoints")
        if fresh and not (saved.is_dir() and any(saved.iterdir())) and discover_environment().rank == 0:
            shutil.rmtree(cfg.run.output_dir, ignore_errors=True)  # refused before it saved: leave nothing behind
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
