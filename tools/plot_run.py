#!/usr/bin/env python
"""Loss, learning-rate, evaluation and throughput curves of a run as a PNG (from its metrics.jsonl).

    python tools/plot_run.py --run runs/my_stage1                 # writes runs/my_stage1/curves.png
    python tools/plot_run.py --run runs/my_stage1 --out curves.png --overwrite
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import run_tool

from blip_train.training.plots import plot_history, read_history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory (its metrics.jsonl) or a metrics.jsonl file")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/curves.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    args = p.parse_args(argv)
    run = Path(args.run)
    history_file = run / "metrics.jsonl" if run.is_dir() else run
    if not history_file.is_file():
        raise ValueError(f"{history_file}: no such file (a run writes metrics.jsonl as it logs)")
    out = Path(args.out) if args.out else history_file.parent / "curves.png"
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    history = read_history(history_file)
    panels = plot_history(history, out, title=str(history_file.parent))
    steps = max((s for series in history.values() for s, _ in series), default=0)
    print(f"plot_run: wrote {out} ({', '.join(panels)}; up to step {steps})")
    print(json.dumps({"out": str(out), "panels": panels, "last_step": steps}))
    return 0


if __name__ == "__main__":
    run_tool(main)
