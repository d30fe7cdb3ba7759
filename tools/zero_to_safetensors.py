#!/usr/bin/env python
"""Consolidate a ZeRO-2/3 checkpoint of ours into safetensors (CPU only, no process group).

    python tools/zero_to_safetensors.py --checkpoint runs/demo/stage1 --out stage1.safetensors
    python tools/zero_to_safetensors.py --checkpoint runs/x/checkpoints --tag step_0004000 \\
        --out runs/x/weights --include-frozen --max-shard-size 2GB --dtype bf16

--checkpoint is a run dir (its newest complete checkpoint), its checkpoints/ dir or a step_* dir.
--out FILE.safetensors writes one file (metadata in its header); any other path is a folder:
model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json when larger
than --max-shard-size, and blip_train_weights.json. By default only the trained parameters (the fp32
master weights); --include-frozen adds the buffers and the frozen towers, read from the sources the run
recorded in complete.json (checkpoints do not carry them), in the dtype training held them in. The
result is what `model.init_from` and tools/export_hf.py accept.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import run_tool

from blip_train.interop.consolidate import consolidate_checkpoint, describe
from blip_train.interop.weights_io import DTYPES, parse_dtype, parse_size, write_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, or a step_* dir")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_0004000 (default: the newest complete)")
    p.add_argument("--out", required=True, help="FILE.safetensors, or a folder (sharded when large)")
    p.add_argument("--include-frozen", action="store_true",
                   help="also write the buffers and the frozen ViT / LLM (read from their recorded sources)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard of a folder output (default 5GB)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of floating tensors (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    parse_size(args.max_shard_size)  # a bad size fails before the (long) merge
    merged = consolidate_checkpoint(args.checkpoint, args.tag, include_frozen=args.include_frozen)
    print(describe(merged))
    files = write_weights(merged.tensors, Path(args.out), merged.meta, overwrite=args.overwrite,
                          max_shard_size=args.max_shard_size, dtype=parse_dtype(args.dtype), progress=True)
    print(f"zero_to_safetensors: wrote {len(merged.tensors)} tensors to {args.out} "
          f"({len(files)} file(s), {args.dtype})")
    print(json.dumps({"out": args.out, "files": [str(f) for f in files], "tensors": len(merged.tensors),
                      "contents": merged.meta["contents"], "source": merged.meta["source"]}))
    return 0


if __name__ == "__main__":
    run_tool(main)
