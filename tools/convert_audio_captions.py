#!/usr/bin/env python
"""Convert AudioCaps / Clotho style audio captioning data to a blip-train MDS audio split.

    python tools/convert_audio_captions.py --audio audiocaps/train --captions audiocaps/train.csv \\
        --out data/mds/audiocaps_train
    python tools/convert_audio_captions.py --audio clotho/development --captions clotho_captions_development.csv \\
        --per-clip --out data/mds/clotho_dev

--captions: AudioCaps' CSV (audiocap_id,youtube_id,start_time,caption) or Clotho's (file_name,caption_1..5),
told apart by the header. Each clip is decoded with PyAV (any audio file, or a video file's audio track),
resampled to 16 kHz mono and stored as FLAC with its log-mel spectrogram as the row's image
(blip_train/data/audio.py says why). Missing, empty, corrupt, silent, too-short and audio-less files are
skipped and counted. One row per caption (the clip's other captions as references), or one per clip
with --per-clip (evaluation splits).
"""
from __future__ import annotations

import argparse

from _common import add_output_args, print_summary, run_tool

from blip_train.data.audio import AUDIO_COLUMNS, read_audio_captions
from blip_train.data.convert import ConvertStats, InputError, run_conversion


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio", required=True, help="audio directory (searched recursively, by file stem)")
    p.add_argument("--captions", required=True, help="AudioCaps or Clotho captions CSV")
    p.add_argument("--per-clip", action="store_true", help="one row per clip, all its captions as references")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="keep the first this many seconds of each clip (default 30: all of Clotho's, AudioCaps' "
                        "10; 0 keeps everything)")
    add_output_args(p)
    args = p.parse_args()
    if args.max_seconds < 0:
        raise InputError("--max-seconds must be 0 (everything) or more")
    stats = ConvertStats()
    jobs = list(read_audio_captions(args.audio, args.captions, stats, dataset=args.dataset_name or "",
                                    per_clip=args.per_clip, max_seconds=args.max_seconds))
    run_conversion(jobs, args.out, stats, workers=args.workers, overwrite=args.overwrite, total=len(jobs),
                   desc="clips", extra_columns=AUDIO_COLUMNS)
    print_summary("convert_audio_captions", stats, "clips")
    return 0


if __name__ == "__main__":
    run_tool(main)
