#!/usr/bin/env python
"""Convert WebDataset tar shards (CC3M/CC12M/SBU/LAION) to a blip-train MDS split.

Members sharing a key form a sample: an image (.jpg/.jpeg/.png/.webp) and a caption in .txt or in
.json {"caption": ...}.

    python tools/convert_webdataset.py --shards 'cc3m/{00000..00331}.tar' --out data/cc3m/train
    python tools/convert_webdataset.py --shards 'laion/*.tar' --out data/laion/train --workers 16
"""
from __future__ import annotations

import argparse

from _common import add_output_args, print_summary, run_tool

from blip_train.data.convert import ConvertStats, run_conversion
from blip_train.data.formats import read_webdataset


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="glob of tar shards (quote it), e.g. 'dir/*.tar'")
    add_output_args(p)
    args = p.parse_args()
    stats = ConvertStats()
    # Streamed, not listed: shards hold the image bytes and can be far larger than memory.
    jobs = read_webdataset(args.shards, stats, dataset=args.dataset_name or "web")
    run_conversion(jobs, args.out, stats, workers=args.workers, overwrite=args.overwrite,
                   resize_short_side=args.resize_short_side, resize_max_side=args.resize_max_side)
    print_summary("convert_webdataset", stats)
    return 0


if __name__ == "__main__":
    run_tool(main)
