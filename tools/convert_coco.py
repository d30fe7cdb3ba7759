#!/usr/bin/env python
"""Convert COCO captions (or a Karpathy split), NoCaps or Flickr30K to a blip-train MDS split.

    python tools/convert_coco.py --images coco/images --annotations captions_train2017.json --out data/coco/train
    python tools/convert_coco.py --images coco/images --annotations coco_karpathy_test.json \\
        --per-image --out data/coco/test
    # NoCaps val (COCO-style captions; each image's domain is kept in `source`: nocaps/in-domain, ...)
    python tools/convert_coco.py --images nocaps/val --annotations nocaps_val_4500_captions.json \\
        --per-image --out data/nocaps/val
    # NoCaps test: images only (no captions), for generating captions to submit
    python tools/convert_coco.py --images nocaps/test --annotations nocaps_test_image_info.json \\
        --per-image --out data/nocaps/test
    # Flickr30K, Karpathy's dataset_flickr30k.json (images[].filename, split, sentences[].raw)
    python tools/convert_coco.py --images flickr30k/flickr30k-images --annotations dataset_flickr30k.json \\
        --split test --per-image --out data/flickr30k/test

The `dataset` column is --dataset-name, else nocaps / flickr30k when the annotation file's name says so,
else coco.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _common import add_output_args, print_summary, run_tool

from blip_train.data.convert import ConvertStats, run_conversion
from blip_train.data.formats import read_coco


def dataset_from_name(annotations: str) -> str:
    """nocaps / flickr30k when the annotation file's name says so, else coco."""
    name = Path(annotations).name.lower()
    return "nocaps" if "nocaps" in name else "flickr30k" if "flickr" in name else "coco"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="image root; annotation paths are relative to it")
    p.add_argument("--annotations", required=True,
                   help="COCO captions JSON (also NoCaps val), a COCO image-info JSON without captions (NoCaps "
                        "test, with --per-image), Karpathy dataset_coco.json / dataset_flickr30k.json, or a list of "
                        "{image, caption}")
    p.add_argument("--split", default=None, help="Karpathy split to keep (train includes restval; val; test)")
    p.add_argument("--per-image", action="store_true",
                   help="one sample per image (evaluation) instead of one per caption (training)")
    add_output_args(p)
    args = p.parse_args()
    stats = ConvertStats()
    jobs = list(read_coco(args.images, args.annotations, stats, split=args.split, per_image=args.per_image,
                          dataset=args.dataset_name or dataset_from_name(args.annotations)))
    run_conversion(jobs, args.out, stats, workers=args.workers, overwrite=args.overwrite,
                   resize_short_side=args.resize_short_side, resize_max_side=args.resize_max_side,
                   total=len(jobs))
    print_summary("convert_coco", stats)
    return 0


if __name__ == "__main__":
    run_tool(main)
