#!/usr/bin/env python
"""CapFilt: bootstrap cleaner caption data with a trained BLIP-2 stage-1 or BLIP model (captioner + filter),
or with a separate captioner run (--captioner) and filter run (--checkpoint), as BLIP fine-tuned them.

For every image of --data the model's ITG pass (BLIP: its image-grounded decoder) samples --num-captions
synthetic captions (nucleus, top-p 0.9, as BLIP); its ITM head scores the web caption and each synthetic one (P(match), softmax of
the 2-way head) and its ITC head their similarity. A caption passes when both scores reach their
thresholds; the web caption is kept when it passes, and the --keep-top synthetic captions with the
highest ITC when they pass. Thresholds (printed, and kept in the report):
  default          both heads at the joint quantile that keeps --keep-rate (0.75) of the input's web captions;
  --calibrate-on   the same on a small split of known-clean pairs, keeping --clean-keep (0.9) of them;
  --itm-threshold / --itc-threshold   fixed values.
The output is an MDS split with one row per image that kept a caption: `captions` holds its kept
captions (web first, then synthetic), one of which the reader draws per visit, with provenance
(`orig_index`; per caption `caption_sources`, `itm_scores`, `itc_scores`). When fewer than --min-keep
(5%) of the images keep a caption, nothing is written and the tool exits 2. A report (images seen, web
kept/dropped, synthetic kept, rates per `noisy` flag, score histograms) is printed and written to
OUT/capfilt_report.json; the last stdout line is the report as JSON.

    python tools/capfilt.py --checkpoint runs/stage1 --data data/laion/train --out data/laion_capfilt/train
    python tools/capfilt.py --captioner runs/blip_ft_caption_coco_vitb --checkpoint runs/blip_ft_retrieval_coco_vitb \\
        --data data/mds/web --out data/mds/web_capfilt --num-captions 1 --keep-top 1 --itm-threshold 0.5
    torchrun --nproc_per_node 8 tools/capfilt.py --checkpoint runs/stage1 --data D --out O --num-captions 10

Sharded and resumable: the input is cut into chunks of --chunk-size samples; ranks share them, each
chunk is written to OUT/.parts with a completion marker, and rank 0 merges them in input order at the
end. After a crash or a time limit, run the same command again (any number of ranks): finished chunks
are skipped. The output does not depend on the number of ranks (sampling is seeded per chunk).

Measured (details in blip_train/capfilt/README.md): the demo's stage-1 model (400 steps on clean
synthetic data) on a fresh `--noise-fraction 0.3` synthetic set (600 images, 180 noisy) with
`--itm-threshold 0 --itc-threshold 0.6` dropped 92.8% of the noisy web captions and kept 96.9% of the
clean ones. Its under-trained ITM head never reaches P(match) 0.5 (the default drops everything) and
at 0.28 separates poorly (51.1% / 90.5%): set thresholds from the report's histograms per model.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from _common import run_tool
from tqdm import tqdm

from blip_train.capfilt import Captioner, CapFiltSettings, format_report, run_capfilt
from blip_train.capfilt.calibrate import ThresholdRule, calibrate


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run dir, its checkpoints/ dir, or a step_* dir: the filter (ITM/ITC), and the captioner "
                        "unless --captioner is given")
    p.add_argument("--captioner", default=None, metavar="RUN",
                   help="a separate captioner (BLIP's CapFilt: a BLIP run fine-tuned on captions, or a BLIP-2 stage-1 "
                        "run): it samples the synthetic captions with its own tokenizer and image size")
    p.add_argument("--data", required=True, help="input MDS split (web image-caption pairs)")
    p.add_argument("--out", required=True, help="output MDS split directory")
    p.add_argument("--num-captions", type=int, default=10, help="synthetic captions sampled per image (0: filter only)")
    p.add_argument("--keep-top", type=int, default=2, help="synthetic captions kept per image at most (top by ITC)")
    p.add_argument("--keep-rate", type=float, default=0.75,
                   help="default rule: thresholds at the joint quantile that keeps this share of the input's web "
                        "captions (default 0.75)")
    p.add_argument("--calibrate-on", default=None, metavar="SPLIT",
                   help="set thresholds on a small split of known-clean pairs instead (e.g. COCO val)")
    p.add_argument("--clean-keep", type=float, default=0.9,
                   help="with --calibrate-on: share of the clean pairs the thresholds keep (default 0.9)")
    p.add_argument("--calibration-samples", type=int, default=512,
                   help="captions scored to set the thresholds (the split's first ones; default 512)")
    p.add_argument("--itm-threshold", type=float, default=None,
                   help="fixed rule: minimum ITM match probability (with --itc-threshold or alone)")
    p.add_argument("--itc-threshold", type=float, default=None,
                   help="fixed rule: minimum ITC similarity (cosine, max over queries)")
    p.add_argument("--min-keep", type=float, default=0.05,
                   help="fail (write nothing) when fewer than this share of the images keep a caption (default 0.05)")
    p.add_argument("--sampling", choices=("nucleus", "greedy"), default="nucleus")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--max-len", type=int, default=0,
                   help="generated tokens per caption incl. [DEC] (default: the captioner run's model.max_txt_len, "
                        "at most 30)")
    p.add_argument("--seed", type=int, default=0, help="caption sampling seed")
    p.add_argument("--chunk-size", type=int, default=256, help="samples per resumable work unit")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--max-chunks", type=int, default=0,
                   help="stop each rank after this many chunks without merging (time-boxed jobs; re-run to continue)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--timeout-minutes", type=int, default=60, help="collective timeout (the final barrier)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the --checkpoint run's config (e.g. model.vision.weights=...)")
    p.add_argument("--captioner-set", dest="captioner_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the --captioner run's config")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (or an unfinished run with other settings)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def choose_thresholds(args: argparse.Namespace, model, tokenizer, cfg) -> ThresholdRule:
    """The filter's thresholds: given (fixed), or set by a rule on scores (see blip_train/capfilt/calibrate.py)."""
    if args.itm_threshold is not None or args.itc_threshold is not None:
        return ThresholdRule("fixed", itm_threshold=args.itm_threshold or 0.0, itc_threshold=args.itc_threshold)
    rule, split, target = (("clean_reference", args.calibrate_on, args.clean_keep) if args.calibrate_on
                           else ("keep_rate", args.data, args.keep_rate))
    return calibrate(model, tokenizer, str(split), rule, target, args.calibration_samples,
                     cfg.model.vision.image_size, cfg.model.max_txt_len, args.batch_size)


CAPTIONING_ARCHS = ("stage1", "blip")
"""Runs whose model can caption (generate_captions): BLIP-2 stage-1's ITG pass, BLIP's decoder; ALBEF has none."""
FILTERING_ARCHS = ("stage1", "blip", "albef")
"""Runs with ITC and ITM heads."""


def load_captioner_config(args: argparse.Namespace, filter_step: Path):
    """(config, checkpoints dir, tag) of --captioner, or None without one or when it is the --checkpoint step
    (one model then does both, as without --captioner: it is loaded once)."""
    from blip_train.eval import load_run_config

    if args.captioner is None:
        return None
    if not Path(args.captioner).exists():
        raise ValueError(f"--captioner {args.captioner}: no such run, checkpoints or step directory")
    try:
        cfg, ckpt_dir, tag = load_run_config(args.captioner, args.captioner_overrides)
    except (OSError, ValueError) as e:  # its messages name the path, not the flag
        raise ValueError(f"--captioner: {e}") from e
    if cfg.model.arch not in CAPTIONING_ARCHS:
        raise ValueError(f"--captioner {ckpt_dir / tag}: model.arch={cfg.model.arch} has no text decoder and cannot "
                         "caption; give a BLIP run (e.g. fine-tuned on COCO captions) or a BLIP-2 stage-1 run")
    if cfg.model.objective in ("retrieval", "vqa"):
        raise ValueError(f"--captioner {ckpt_dir / tag}: a {cfg.model.objective} fine-tuning run (model.objective="
                         f"{cfg.model.objective}) does not train the decoder; give a BLIP pretraining or captioning run")
    if (ckpt_dir / tag).resolve() == filter_step.resolve() and args.captioner_overrides == args.overrides:
        return None
    return cfg, ckpt_dir, tag


def main() -> int:
    args = parse_args()
    if not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: not a directory")
    import torch

    from blip_train.distributed import destroy_distributed, discover_environment, export_environment, init_distributed
    from blip_train.distributed.env import cuda_device_index
    from blip_train.eval import load_run_config
    from blip_train.training.stages import load_trained_retrieval_model

    cfg, ckpt_dir, tag = load_run_config(args.checkpoint, args.overrides)
    captioner_run = load_captioner_config(args, ckpt_dir / tag)
    if captioner_run is None and cfg.model.arch not in CAPTIONING_ARCHS:
        raise ValueError(f"--checkpoint {ckpt_dir / tag}: model.arch={cfg.model.arch}, CapFilt needs a BLIP-2 stage-1 "
                         "or a BLIP run (a captioner and ITC/ITM heads), or a captioner given with --captioner")
    if cfg.model.arch not in FILTERING_ARCHS:
        raise ValueError(f"--checkpoint {ckpt_dir / tag}: model.arch={cfg.model.arch} has no ITC/ITM heads to filter "
                         f"with (one of {', '.join(FILTERING_ARCHS)})")
    if cfg.model.objective in ("caption", "vqa"):
        raise ValueError(f"--checkpoint {ckpt_dir / tag}: a {cfg.model.objective} run (model.objective="
                         f"{cfg.model.objective}) does not train the ITC/ITM heads; filter with a BLIP pretraining or "
                         "retrieval run (a captioner goes with --captioner)")
    if captioner_run is None and cfg.model.objective == "retrieval":
        raise ValueError(f"--checkpoint {ckpt_dir / tag}: a retrieval fine-tuning run does not train the decoder; give "
                         "the captioner with --captioner (a BLIP captioning or pretraining run)")
    if args.calibrate_on and not Path(args.calibrate_on).is_dir():
        raise ValueError(f"--calibrate-on {args.calibrate_on}: not a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")

    env = discover_environment()
    export_environment(env)
    if env.world_size > 1:
        init_distributed(env, args.timeout_minutes)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    if use_cuda:  # the device init_distributed picked; one GPU per task (--gpus-per-task=1) is device 0
        device = torch.device("cuda", cuda_device_index(env.local_rank, env.local_world_size, torch.cuda.device_count(),
                                                        os.environ.get("CUDA_VISIBLE_DEVICES")))
    model, tokenizer = load_trained_retrieval_model(cfg, ckpt_dir, tag, device_type=device.type)
    model.to(device).eval()
    captioner, cap_cfg = None, cfg
    if captioner_run is not None:  # on the same device as the filter: the captions go straight on to it
        cap_cfg, cap_dir, cap_tag = captioner_run
        cap_model, cap_tokenizer = load_trained_retrieval_model(cap_cfg, cap_dir, cap_tag, device_type=device.type)
        captioner = Captioner(cap_model.to(device).eval(), cap_tokenizer, cap_cfg.model.vision.image_size,
                              run=str((cap_dir / cap_tag).resolve()))
    rule = choose_thresholds(args, model, tokenizer, cfg)  # every rank finds the same ones
    if env.rank == 0:
        if captioner is not None:
            print(f"capfilt: captions by {captioner.run} ({cap_cfg.model.arch}, {captioner.image_size} px), "
                  f"filtered by {(ckpt_dir / tag).resolve()} ({cfg.model.arch}, {cfg.model.vision.image_size} px)",
                  flush=True)
        print(f"capfilt: {rule.describe()}", flush=True)
    settings = CapFiltSettings(
        image_size=cfg.model.vision.image_size, max_txt_len=cfg.model.max_txt_len, num_captions=args.num_captions,
        keep_top=args.keep_top, itm_threshold=rule.itm_threshold, itc_threshold=rule.itc_threshold,
        sampling=args.sampling, top_p=args.top_p,
        max_len=args.max_len or min(30, cap_cfg.model.max_txt_len), seed=args.seed, chunk_size=args.chunk_size,
        batch_size=args.batch_size, min_keep=args.min_keep)

    bar = None

    def progress(n: int, total: int) -> None:
        nonlocal bar
        if env.rank == 0:
            bar = bar or tqdm(total=total, desc="capfilt rank 0", unit="img", dynamic_ncols=True)
            bar.update(n)

    identity = {"checkpoint": str((ckpt_dir / tag).resolve()), "data": str(Path(args.data).resolve()),
                "thresholds": dict(rule.as_dict(), description=rule.describe())}
    try:
        report = run_capfilt(model, tokenizer, args.data, args.out, settings, identity=identity, rank=env.rank,
                             world=env.world_size, overwrite=args.overwrite, max_chunks=args.max_chunks,
                             progress=progress, captioner=captioner)
    finally:
        if bar is not None:
            bar.close()  # before any error line: that must be the last one
    if env.world_size > 1:
        destroy_distributed()
    if env.rank == 0:
        if report is None:
            print(f"capfilt: stopped after --max-chunks {args.max_chunks}; run the same command again to continue")
        else:
            print(format_report(report))
            print(f"capfilt: wrote {report['rows_written']} samples to {args.out}")
            print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_tool(main)
