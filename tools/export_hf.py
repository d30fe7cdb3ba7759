#!/usr/bin/env python
"""Export a checkpoint of ours as a transformers folder (`from_pretrained(DIR)` + `generate`).

    python tools/export_hf.py --checkpoint runs/demo/stage2_opt --out exports/blip2-opt
    python tools/export_hf.py --checkpoint runs/demo/instruct_t5/checkpoints/step_0000300 --out exports/ib-t5
    python tools/export_hf.py --checkpoint stage1_weights/ --out exports/blip2-itm --dtype bf16

model.arch stage1 -> Blip2ForImageTextRetrieval, stage2 -> Blip2ForConditionalGeneration, instruct ->
InstructBlipForConditionalGeneration; the folder holds config.json, the weights, the processor (image
processor + tokenizers) and generation_config.json. --checkpoint is a run dir / checkpoints dir /
step_* dir (the run's config.yaml rebuilds the model) or a weights folder / .safetensors written by
zero_to_safetensors.py or import_hf.py (they carry the config). Frozen ViT and LLM weights come from
the run's sources (model.vision.weights, model.llm.path); --set model.llm.path=... points elsewhere when
they moved, --config supplies a config for weights that carry none (tools/import_lavis.py output).
LoRA adapters (model.llm.lora) are merged into the exported LLM, or kept apart with --lora-adapter:
    python tools/export_hf.py --checkpoint runs/opt_lora --out exports/opt-lora --lora-adapter
    # model.language_model.load_adapter("exports/opt-lora/lora_adapter") after from_pretrained
Not exported: the ITC temperature and the Q-Former LM head (transformers' classes have no place for them).

model.arch blip (BLIP pretraining: ViT + MED) maps to three transformers classes; --hf-class picks one per
folder (default BlipForImageTextRetrieval; a fine-tuning run exports to the class of its model.objective only,
which is then the default):
    python tools/export_hf.py --checkpoint runs/blip_base --out exports/blip-itm
    python tools/export_hf.py --checkpoint runs/blip_base --out exports/blip-cap --hf-class BlipForConditionalGeneration
    python tools/export_hf.py --checkpoint runs/blip_base --out exports/blip-vqa --hf-class BlipForQuestionAnswering
  BlipForImageTextRetrieval     ViT, text_encoder (the MED's encoder), vision_proj, text_proj, itm_head.
                                use_itm_head=True: pass [ENC]-first input_ids (the processor writes [CLS]; BLIP's
                                image-grounded encoder reads [ENC] there, transformers does not replace it);
                                use_itm_head=False: [CLS]-first, gives the ITC cosine similarities.
  BlipForConditionalGeneration  ViT, text_decoder (the MED's decoder: its own causal self-attention, all else
                                shared with the encoder, written out); input_ids [DEC]-first (bos).
  BlipForQuestionAnswering      both: text_encoder and text_decoder as above (the start of BLIP's VQA fine-tuning);
                                a VQA run (model.objective=vqa) writes its question encoder and its own answer
                                decoder.
Each folder holds a BlipProcessor (BLIP's BERT tokenizer with [DEC] as bos and [ENC]; image processor at
model.vision.image_size with OpenAI CLIP mean/std); the captioning / VQA folders carry the run's decoding
defaults (eval.num_beams, eval.max_new_tokens / eval.vqa_max_new_tokens, ...). Not exported for BLIP: the
momentum encoders and feature queue (transformers' classes have no momentum parts); the ITC temperature is
written as config.logit_scale_init_value = ln(1/temp), which tools/import_hf.py reads back. ALBEF has no
transformers class.
"""
from __future__ import annotations

import argparse
import json

from _common import run_tool

from blip_train.interop.hf_export import export_hf
from blip_train.interop.weights_io import DTYPES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run / checkpoints / step_* dir, or weights folder / file")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the exported weights")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight shard (default 5GB)")
    p.add_argument("--config", default=None,
                   help="YAML / recipe that rebuilds the model, replacing the one the checkpoint carries")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.llm.path=/models/opt-2.7b (repeatable)")
    p.add_argument("--lora-adapter", action="store_true",
                   help="write the LLM's LoRA adapters as a peft adapter folder OUT/lora_adapter instead of merging "
                        "them into the exported LLM (the default)")
    p.add_argument("--hf-class", default=None, metavar="CLASS",
                   help="transformers class to write: for model.arch=blip one of BlipForImageTextRetrieval (default; "
                        "a fine-tuning run: its objective's), BlipForConditionalGeneration, BlipForQuestionAnswering; "
                        "BLIP-2 archs have one (implied)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    summary = export_hf(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size, config=args.config, overrides=args.overrides,
                        lora_adapter=args.lora_adapter, hf_class_name=args.hf_class,
                        log=lambda s: print(f"export_hf: {s}", flush=True))
    print(f"export_hf: wrote {summary['class']} ({summary['tensors']} tensors, {args.dtype}) to {args.out}")
    print(json.dumps(dict(summary, out=args.out)))
    return 0


if __name__ == "__main__":
    run_tool(main)
