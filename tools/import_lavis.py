#!/usr/bin/env python
"""Import LAVIS BLIP-2 / InstructBLIP checkpoints, BLIP pretraining checkpoints or EVA ViT-g weights into our names.

    python tools/import_lavis.py --checkpoint blip2_pretrained.pth --out weights/blip2-stage1
    python tools/import_lavis.py --checkpoint instruct_blip_vicuna7b_trimmed.pth --out weights/ib-vicuna7b
    python tools/import_lavis.py --eva eva_vit_g.pth --out weights/eva_vit_g.safetensors

--checkpoint: a LAVIS .pth (Blip2Qformer stage 1, Blip2OPT / Blip2T5 stage 2, Blip2VicunaInstruct /
Blip2T5Instruct); the stage is detected (override with --arch). The output folder (model.safetensors +
blip_train_weights.json, and vision.safetensors when the file holds the ViT) is what model.init_from
loads; the frozen LLM tensors LAVIS may hold are left out (model.llm.path supplies the LLM).
A BLIP pretraining checkpoint (the authors' model_base.pth / model_large.pth, or LAVIS's BlipPretrain) is
detected by its text_encoder.* keys (or --arch blip) and becomes a model.arch=blip weights folder with the
online weights, the momentum encoders and the feature queues, which model.init_from loads as they are:
    python tools/import_lavis.py --checkpoint model_base.pth --out weights/blip-base
The authors' BLIP VQA checkpoints (an untied text_decoder, no ITC / ITM heads) become the weights of a
model.objective=vqa run; the authors' ALBEF checkpoints (ALBEF_4M.pth, ALBEF.pth: text_encoder.bert.*, or
--arch albef) a model.arch=albef folder with momentum encoders and queues:
    python tools/import_lavis.py --checkpoint model_base_vqa_capfilt_large.pth --out weights/blip-vqa
    python tools/import_lavis.py --checkpoint ALBEF_4M.pth --out weights/albef-4m
--eva: EVA ViT weights (as LAVIS downloads them) -> one .safetensors for model.vision.weights.
"""
from __future__ import annotations

import argparse
import json

from _common import run_tool

from blip_train.interop.lavis import ARCHS, import_eva_vit, import_lavis
from blip_train.interop.weights_io import DTYPES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="LAVIS .pth checkpoint")
    src.add_argument("--eva", help="EVA ViT .pth weights")
    p.add_argument("--out", required=True, help="output weights folder (--checkpoint) or .safetensors file (--eva)")
    p.add_argument("--arch", choices=ARCHS, default=None, help="stage of the LAVIS checkpoint (default: detected)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the EVA weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    log = lambda s: print(f"import_lavis: {s}", flush=True)  # noqa: E731
    if args.eva:
        summary = import_eva_vit(args.eva, args.out, dtype=args.dtype, overwrite=args.overwrite, log=log)
    else:
        summary = import_lavis(args.checkpoint, args.out, arch=args.arch, overwrite=args.overwrite, log=log)
    print(f"import_lavis: wrote {args.out}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_tool(main)
