#!/usr/bin/env python
"""Import ULIP-2's Point-BERT (the frozen 3D encoder of X-InstructBLIP) as a tower folder for model.points.encoder.

    python tools/import_ulip2_pointbert.py --checkpoint ULIP-2-PointBERT-10k-colored.pt --out weights/pointbert

The checkpoint is ULIP-2's (the point encoder under module.point_encoder., beside its projection and possibly
other towers, which are left out) or a bare Point-BERT state dict. Width, depth, input channels (3: xyz,
6: xyz + rgb) and the patch PointNet's width are read from the tensors; the head count and the patching
(--num-heads, --group-size, --num-group) are not in any tensor: the defaults are ULIP-2's.
"""
from __future__ import annotations

import argparse
import json

from _common import run_tool

from blip_train.interop.ulip2 import import_ulip2_pointbert


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ULIP-2 .pt checkpoint (or a Point-BERT state dict)")
    p.add_argument("--out", required=True, help="output tower folder (config.json + model.safetensors)")
    p.add_argument("--num-heads", type=int, default=6, help="attention heads per block (default 6, ULIP-2's)")
    p.add_argument("--group-size", type=int, default=32, help="points per patch (default 32)")
    p.add_argument("--num-group", type=int, default=512, help="patches per cloud (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    summary = import_ulip2_pointbert(args.checkpoint, args.out, num_heads=args.num_heads, group_size=args.group_size,
                                     num_group=args.num_group, overwrite=args.overwrite,
                                     log=lambda s: print(f"import_ulip2_pointbert: {s}", flush=True))
    print(f"import_ulip2_pointbert: wrote {args.out}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_tool(main)
