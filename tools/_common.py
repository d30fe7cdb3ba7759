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
from blip_train.data.images import RESIZE_SHORT_SIDE  # noqa: E402
from blip_train.data.schema import SchemaError  # noqa: E402


def add_output_args(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """--out, --overwrite and (for converters) --workers / --resize-short-side / --resize-max-side."""
    parser.add_argument("--out", required=True, help="output MDS split directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    if workers:
        parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                            help="processes decoding/normalising images (default: min(8, CPUs))")
        parser.add_argument("--resize-short-side", type=int, default=RESIZE_SHORT_SIDE,
                            help=f"downscale images whose shorter side exceeds this to it (default "
                                 f"{RESIZE_SHORT_SIDE}: enough for 224-490 px training; 0 with --resize-max-side 0 "
                                 "keeps every image as it is)")
        parser.add_argument("--resize-max-side", type=int, default=0,
                            help="also downscale images whose longer side exceeds this (default 0: no bound)")
        parser.add_argument("--dataset-name", default=None, help="value of the `dataset` column")


def print_summary(name: str, stats: ConvertStats, sources: str = "images") -> None:
    """One human line, then the same as JSON (scripts parse the last line). `sources`: what a job reads
    (images, videos, clips)."""
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())) or "none"
    saved = stats.image_bytes_read - stats.image_bytes_stored
    share = f" ({saved / stats.image_bytes_read:.0%})" if stats.image_bytes_read else ""
    print(f"{name}: wrote {stats.written} samples ({stats.images} {sources}) to {stats.out}; {sources} stored in "
          f"{_size(stats.image_bytes_stored)} of {_size(stats.image_bytes_read)} read, {_size(saved)} saved{share}; "
          f"skipped: {skipped}")
    print(json.dumps(stats.as_dict(), sort_keys=True))


def _size(n: float) -> str:
    """Bytes in B / KB / MB / GB / TB (powers of 1000)."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


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
