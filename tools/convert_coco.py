#!/usr/bin/env python
"""Convert COCO captions (or a Karpathy split) to a blip-train MDS split.

    python tools/convert_coco.py --images coco/images --annotations captions_train2017.json --out data/coco/train
    python tools/convert_coco.py --images coco/images --annotations coco_karpathy_test.json \\
        --per-image --out data/coco/test
"""
from __future__ import annotations

import argparse

from _common import add_output_args, print_summary, run_tool

from blip_train.data.convert import ConvertStats, run_conversion
from blip_train.data.formats import read_coco


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="image root; annotation paths are relative to it")
    p.add_argument("--annotations", required=True,
                   help="COCO captions JSON, Karpathy dataset_coco.json, or a list of {image, caption}")
    p.add_argument("--split", default=None, help="Karpathy split to keep (train includes restval; val; test)")
    p.add_argument("--per-image", action="store_true",
                   help="one sample per image (evaluation) instead of one per caption (training)")
    add_output_args(p)
    args = p.parse_args()
    stats = ConvertStats()
    jobs = list(read_coco(args.images, args.annotations, stats, split=args.split, per_image=args.per_image,
                          dataset=args.dataset_name or "coco"))
    run_conversion(jobs, args.out, stats, workers=args.workers, overwrite=args.overwrite,
                   resize_short_side=args.resize_short_side, resize_max_side=args.resize_max_side,
                   total=len(jobs))
    print_summary("convert_coco", stats)
    return 0


if __name__ == "__main__":
    run_tool(main)
