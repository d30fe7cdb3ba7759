#!/usr/bin/env python
"""Convert LLaVA-style instruction JSON to a blip-train MDS split (one sample per human/gpt turn pair).

    python tools/convert_instruct_json.py --images coco/train2017 --json llava_instruct_150k.json \\
        --out data/llava/train
"""
from __future__ import annotations

import argparse

from _common import add_output_args, print_summary, run_tool

from blip_train.data.convert import ConvertStats, run_conversion
from blip_train.data.formats import read_llava


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="image root; record `image` paths are relative to it")
    p.add_argument("--json", required=True, help="[{image, conversations: [{from, value}, ...]}] (or .jsonl)")
    add_output_args(p)
    args = p.parse_args()
    stats = ConvertStats()
    jobs = list(read_llava(args.images, args.json, stats, dataset=args.dataset_name or "llava_instruct"))
    run_conversion(jobs, args.out, stats, workers=args.workers, overwrite=args.overwrite,
                   resize_short_side=args.resize_short_side, resize_max_side=args.resize_max_side,
                   total=len(jobs))
    print_summary("convert_instruct_json", stats)
    return 0


if __name__ == "__main__":
    run_tool(main)
