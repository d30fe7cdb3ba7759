#!/usr/bin/env python
"""Convert VQAv2 / OK-VQA (questions + annotations JSON), GQA or Visual Genome QA to a blip-train MDS split.

    python tools/convert_vqa.py --images coco/train2014 --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --out data/vqav2/train
    python tools/convert_vqa.py --images gqa/images --gqa train_balanced_questions.json --out data/gqa/train
    python tools/convert_vqa.py --images vg/images --vg-qa question_answers.json --out data/vg_qa
"""
from __future__ import annotations

import argparse

from _common import add_output_args, print_summary, run_tool

from blip_train.data.convert import ConvertStats, InputError, run_conversion
from blip_train.data.formats import read_gqa, read_vg_qa, read_vqa


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="image directory (searched recursively for VQA)")
    p.add_argument("--questions", help="VQA questions JSON {\"questions\": [...]}")
    p.add_argument("--annotations", help="VQA annotations JSON (omit for test splits without answers)")
    p.add_argument("--gqa", help="GQA questions JSON {qid: {imageId, question, answer}} (instead of --questions)")
    p.add_argument("--vg-qa", help="Visual Genome question_answers.json [{id, qas: [...]}] (instead of --questions)")
    add_output_args(p)
    args = p.parse_args()
    if sum(bool(x) for x in (args.questions, args.gqa, args.vg_qa)) != 1:
        raise InputError("give exactly one of --questions (VQAv2/OK-VQA), --gqa or --vg-qa")
    stats = ConvertStats()
    if args.vg_qa:
        jobs = list(read_vg_qa(args.images, args.vg_qa, stats, dataset=args.dataset_name or "vg_qa"))
    elif args.gqa:
        jobs = list(read_gqa(args.images, args.gqa, stats, dataset=args.dataset_name or "gqa"))
    else:
        jobs = list(read_vqa(args.images, args.questions, args.annotations, stats,
                             dataset=args.dataset_name or "vqav2"))
    run_conversion(jobs, args.out, stats, workers=args.workers, overwrite=args.overwrite,
                   resize_short_side=args.resize_short_side, resize_max_side=args.resize_max_side,
                   total=len(jobs))
    print_summary("convert_vqa", stats)
    return 0


if __name__ == "__main__":
    run_tool(main)
