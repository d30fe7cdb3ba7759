#!/usr/bin/env python
"""Convert Cap3D-style 3D captioning data (point clouds + captions) to a blip-train MDS point-cloud split.

    python tools/convert_point_clouds.py --points cap3d/pcs --captions Cap3D_automated_Objaverse.csv \\
        --out data/mds/cap3d_train

--captions: `uid,caption` lines (Cap3D's CSV, no header; a `uid,caption` header is accepted). Each cloud is
found under --points by its uid (.npy of shape (N, 3) or (N, 6) with colours, .npz, or .ply), centred, scaled
into the unit sphere and reduced to --num-points points by farthest point sampling, as ULIP-2 / X-InstructBLIP
feed Point-BERT (blip_train/data/points.py); a front view of it is the row's picture. Missing, empty, corrupt,
non-finite, degenerate and too-small clouds are skipped and counted.
"""
from __future__ import annotations

import argparse

from _common import add_output_args, print_summary, run_tool

from blip_train.data.convert import ConvertStats, InputError, run_conversion
from blip_train.data.points import NUM_POINTS, POINTS_COLUMNS, read_cap3d_captions


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", required=True, help="point-cloud directory (searched recursively, by file stem)")
    p.add_argument("--captions", required=True, help="Cap3D-style captions CSV (uid,caption)")
    p.add_argument("--num-points", type=int, default=NUM_POINTS,
                   help=f"points kept per cloud by farthest point sampling (default {NUM_POINTS}, ULIP-2's)")
    add_output_args(p)
    args = p.parse_args()
    if args.num_points < 1:
        raise InputError("--num-points must be at least 1")
    stats = ConvertStats()
    jobs = list(read_cap3d_captions(args.points, args.captions, stats, dataset=args.dataset_name or "",
                                    num_points=args.num_points))
    run_conversion(jobs, args.out, stats, workers=args.workers, overwrite=args.overwrite, total=len(jobs),
                   desc="clouds", extra_columns=POINTS_COLUMNS)
    print_summary("convert_point_clouds", stats, "clouds")
    return 0


if __name__ == "__main__":
    run_tool(main)
