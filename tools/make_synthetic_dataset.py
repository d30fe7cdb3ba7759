#!/usr/bin/env python
"""Write the learnable synthetic shapes dataset (DIR/train and DIR/val) used by tests and `make demo`.

Images show one or two coloured shapes; every sample has a caption and a question/answer, with the
task rotating caption / vqa / conversation. The same arguments always give the same bytes.

    python tools/make_synthetic_dataset.py --out runs/demo/data --num-samples 2000 --noise-fraction 0.1
    python tools/make_synthetic_dataset.py --out runs/demo/data_video --num-samples 1600 --video-frames 4

--video-frames N writes video splits instead (blip_train/data/synthetic_video.py): a shape moving across N
frames beside a still one, with questions only the motion answers (which way, which shape, what colour moves).
--audio writes audio splits (blip_train/data/synthetic_audio.py): tones whose pitch, rhythm and loudness the
captions name.
--points writes point-cloud splits (blip_train/data/synthetic_points.py): coloured solids, three questions each
(shape, colour, tall or wide); --num-samples counts clouds.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import run_tool
from tqdm import tqdm

from blip_train.data.synthetic import write_synthetic_dataset
from blip_train.data.synthetic_audio import write_synthetic_audio_dataset
from blip_train.data.synthetic_points import QUESTIONS, write_synthetic_points_dataset
from blip_train.data.synthetic_video import write_synthetic_video_dataset


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    p.add_argument("--num-samples", type=int, required=True, help="total samples (train + val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-fraction", type=float, default=0.0,
                   help="share of TRAIN captions replaced by another scene's caption (noisy=1)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--patterns", action="store_true",
                   help="the fine-tuning split: shapes plain or striped, captions name the stripes (own scenes)")
    p.add_argument("--video-frames", type=int, default=0,
                   help="write video clips of this many frames (motion questions) instead of images")
    p.add_argument("--audio", action="store_true", help="write audio clips (tones the captions describe) instead")
    p.add_argument("--audio-seconds", type=float, default=2.0, help="length of each audio clip (default 2)")
    p.add_argument("--points", action="store_true", help="write point clouds (solids asked about) instead")
    p.add_argument("--num-points", type=int, default=512, help="points per cloud with --points (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace existing train/ and val/")
    args = p.parse_args()
    existing = [str(Path(args.out) / s) for s in ("train", "val") if (Path(args.out) / s).exists()]
    if existing and not args.overwrite:  # refuse before any work (and before the progress bar)
        raise FileExistsError(f"{', '.join(existing)} exists; pass --overwrite to replace it")
    start = time.time()
    if args.audio:
        with tqdm(total=args.num_samples, desc="clips", unit="clip", dynamic_ncols=True) as bar:
            summary = write_synthetic_audio_dataset(args.out, args.num_samples, seed=args.seed,
                                                    seconds=args.audio_seconds, val_fraction=args.val_fraction,
                                                    overwrite=args.overwrite, on_write=lambda: bar.update(1))
        print(f"make_synthetic_dataset: wrote {summary['train']} train + {summary['val']} val audio clips of "
              f"{args.audio_seconds:g} s to {args.out} in {time.time() - start:.1f}s")
        print(json.dumps(summary, sort_keys=True))
        return 0
    if args.points:
        with tqdm(total=args.num_samples * len(QUESTIONS), desc="rows", unit="row", dynamic_ncols=True) as bar:
            summary = write_synthetic_points_dataset(args.out, args.num_samples, seed=args.seed,
                                                     num_points=args.num_points, val_fraction=args.val_fraction,
                                                     overwrite=args.overwrite, on_write=lambda: bar.update(1))
        print(f"make_synthetic_dataset: wrote {summary['train']} train + {summary['val']} val question rows about "
              f"{args.num_samples} clouds of {args.num_points} points to {args.out} in {time.time() - start:.1f}s")
        print(json.dumps(summary, sort_keys=True))
        return 0
    if args.video_frames:
        with tqdm(total=args.num_samples, desc="clips", unit="clip", dynamic_ncols=True) as bar:
            summary = write_synthetic_video_dataset(args.out, args.num_samples, seed=args.seed, frames=args.video_frames,
                                                    val_fraction=args.val_fraction, image_size=args.image_size,
                                                    overwrite=args.overwrite, on_write=lambda: bar.update(1))
        print(f"make_synthetic_dataset: wrote {summary['train']} train + {summary['val']} val clips of "
              f"{args.video_frames} frames to {args.out} in {time.time() - start:.1f}s")
        print(json.dumps(summary, sort_keys=True))
        return 0
    with tqdm(total=args.num_samples, desc="samples", unit="img", dynamic_ncols=True) as bar:
        summary = write_synthetic_dataset(args.out, args.num_samples, seed=args.seed,
                                          noise_fraction=args.noise_fraction, val_fraction=args.val_fraction,
                                          image_size=args.image_size, overwrite=args.overwrite,
                                          on_write=lambda: bar.update(1), patterns=args.patterns)
    print(f"make_synthetic_dataset: wrote {summary['train']} train + {summary['val']} val samples "
          f"({summary['noisy']} noisy, tasks {summary['tasks']}) to {args.out} in {time.time() - start:.1f}s")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_tool(main)
