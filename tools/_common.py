"""Shared CLI plumbing for the dataset tools: common flags, one-line failures, summaries."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

# Tools run as `python tools/x.py` from a checkout: make the library importable without install.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from blip_train.data.convert import ConvertStats, InputError  # noqa: E402
from blip_train.data.schema import SchemaError  # noqa: E402


def add_output_args(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """--out, --overwrite and (for converters) --workers / --resize-max-side."""
    parser.add_argument("--out", required=True, help="output MDS split directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    if workers:
        parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                            help="processes decoding/normalising images (default: min(8, CPUs))")
        parser.add_argument("--resize-max-side", type=int, default=0,
                            help="downscale images whose longer side exceeds this (0: keep size)")
        parser.add_argument("--dataset-name", default=None, help="value of the `dataset` column")


def print_summary(name: str, stats: ConvertStats) -> None:
    """One human line, then the same as JSON (scripts parse the last line)."""
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())) or "none"
    print(f"{name}: wrote {stats.written} samples ({stats.images} images) to {stats.out}; skipped: {skipped}")
    print(json.dumps(stats.as_dict(), sort_keys=True))


def run_tool(main: Callable[[], int | None]) -> None:
    """Run a tool's main; expected failures exit 2 with a single `error: ...` line, no traceback."""
    try:
        code = main()
    except (InputError, SchemaError, OSError, ValueError) as e:  # OSError: missing/unreadable inputs
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (partial output removed)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
