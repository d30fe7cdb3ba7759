#!/usr/bin/env python
"""Convert MSRVTT-QA / MSVD-QA style video question answering to a blip-train MDS video split.

    python tools/convert_video_qa.py --videos msrvtt/videos --qa msrvtt_qa/train_qa.json --out data/mds/msrvtt_qa_train
    python tools/convert_video_qa.py --videos msvd/YouTubeClips --qa msvd_qa/train_qa.json \\
        --mapping msvd/youtube_mapping.txt --out data/mds/msvd_qa_train

--qa: a JSON (or .jsonl) list of {question, answer, video_id | video, id}. Each video is decoded with PyAV and
--frames frames (default 4, InstructBLIP's) are sampled at the middle of equal segments and stored as JPEGs
with their times (blip_train/data/video.py says why frames, not clips). Missing, empty, corrupt and non-video
files, and clips with fewer frames than --frames, are skipped and counted.
"""
from __future__ import annotations

import argparse

from _common import add_output_args, print_summary, run_tool

from blip_train.data.convert import ConvertStats, InputError, run_conversion
from blip_train.data.video import VIDEO_COLUMNS, read_video_qa


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="video directory (searched recursively, by file stem)")
    p.add_argument("--qa", required=True, help="question-answer JSON list")
    p.add_argument("--mapping", help="MSVD's youtube_mapping.txt: '<youtube stem> vid<N>' per line")
    p.add_argument("--frames", type=int, default=4, help="frames sampled per video (default 4)")
    add_output_args(p)
    args = p.parse_args()
    if args.frames < 1:
        raise InputError("--frames must be at least 1")
    stats = ConvertStats()
    jobs = list(read_video_qa(args.videos, args.qa, stats, frames=args.frames, mapping=args.mapping,
                              dataset=args.dataset_name or "video_qa"))
    run_conversion(jobs, args.out, stats, workers=args.workers, overwrite=args.overwrite,
                   resize_short_side=args.resize_short_side, resize_max_side=args.resize_max_side,
                   total=len(jobs), desc="videos", extra_columns=VIDEO_COLUMNS)
    print_summary("convert_video_qa", stats, "videos")
    return 0


if __name__ == "__main__":
    run_tool(main)
