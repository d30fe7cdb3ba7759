#!/usr/bin/env python
"""Import a transformers BLIP-2 / InstructBLIP / BLIP folder to initialise training from it.

    python tools/import_hf.py --hf /models/blip2-opt-2.7b --out weights/blip2-opt-2.7b
    python -m blip_train.train --config my_stage2.yaml --set model.init_from=weights/blip2-opt-2.7b

Accepts Blip2ForImageTextRetrieval (-> stage1), Blip2ForConditionalGeneration (-> stage2) and
InstructBlipForConditionalGeneration (-> instruct) folders. Writes model.safetensors (trained parts in
our names, what model.init_from loads), vision.safetensors (model.vision.weights), llm/
(model.llm.path), qformer_tokenizer/ (model.qformer.tokenizer), blip_train_weights.json and
config_snippet.yaml (the matching `model:` section). tools/export_hf.py on the result reproduces the
original weights bit for bit.

BLIP (transformers' BlipForImageTextRetrieval, -> model.arch=blip): the ViT, the MED's encoder parts and the
ITC/ITM heads; --decoder adds the decoder's own parts (causal self-attention, LM head) from a
BlipForConditionalGeneration folder of the same model (export_hf writes both from one run):
    python tools/import_hf.py --hf exports/blip-itm --decoder exports/blip-cap --out weights/blip
Without --decoder, model.init_from starts the decoder self-attention as a copy of the encoder's (as from BERT)
and the LM head's transform at its init. The temperature is read from config.logit_scale_init_value (ln(1/temp));
the momentum encoders start as copies of the imported weights. The authors' BLIP checkpoints (model_base.pth,
with momentum encoders and queues) go through tools/import_lavis.py.
"""
from __future__ import annotations

import argparse
import json

from _common import run_tool

from blip_train.interop.hf_import import import_hf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="local transformers model folder")
    p.add_argument("--out", required=True, help="output weights folder")
    p.add_argument("--decoder", default=None,
                   help="BLIP only: a BlipForConditionalGeneration folder supplying the decoder's own weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    summary = import_hf(args.hf, args.out, overwrite=args.overwrite, decoder=args.decoder,
                        log=lambda s: print(f"import_hf: {s}", flush=True))
    print(f"import_hf: wrote model.arch={summary['arch']} weights to {args.out} (model section: "
          f"{args.out}/config_snippet.yaml)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_tool(main)
