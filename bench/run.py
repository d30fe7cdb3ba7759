"""`make bench`: blip-train vs the transformers reference, side by side in one process.

    python bench/run.py                    # CPU: "small" preset, 1 thread (what `make bench` runs)
    python bench/run.py --device cuda      # GPU: ViT-g/14 + BERT-base preset, bf16 autocast, flash vs
                                           # SDPA, images/s per GPU and MFU (automatic when CUDA exists)
    python bench/run.py --skip-data        # models only (the data bench alone: python bench/data.py)

First the input pipeline (bench/data.py): images/s per worker core of (a) decoding the stored JPEGs,
(b) the LAVIS pipeline and (c) our stage-1 loader, on COCO-sized, web-sized and pre-resized photographs;
its table and JSON line come first, and its ratios are repeated under "data" in the closing JSON line.

Compared, with identical weights and inputs and the same loss functions on both sides:
  stage 1: ViT + ITC + ITM forward and backward, ours vs Blip2ForImageTextRetrieval's modules;
  stage 2: the whole LM step, ours (Blip2LLM) vs Blip2ForConditionalGeneration.
Our full stage-1 step (ITC + ITM + ITG) is timed alone, for information, once per attention backend.
Prints a table (medians over repetitions) and, last, one JSON line whose `ratio_vs_reference` is
ours / reference for stage 1 (the median of per-repetition ratios; lower is better).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import torch  # noqa: E402

from bench.common import (PRESETS, Preset, count_attention_backends, device_sync, median,  # noqa: E402
                          print_markdown_table, set_attention_, time_side_by_side, train_step_fn, with_batch)
from blip_train.models.attention import flash_available  # noqa: E402
from blip_train.training.flops import llm_shape, llm_stage_flops, peak_flops, stage1_flops  # noqa: E402


@dataclass
class Row:
    key: str
    work: str
    ours_s: list[float]
    ref_s: Optional[list[float]]
    flops: float
    """Model FLOPs of one step (training/flops.py), the same count for both sides."""
    samples: int
    peak_gib: Optional[float] = None
    """Device memory of one step of ours beyond the resident weights (CUDA)."""
    loss_diff: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        """Median of the per-repetition ours/reference ratios (each pair ran back to back)."""
        if self.ref_s is None:
            return None
        return median([o / r for o, r in zip(self.ours_s, self.ref_s)])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--gpu", action="store_const", dest="device", const="cuda", help="same as --device cuda")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model/batch size (default: small on CPU, gpu on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (fixed, so runs are comparable)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=15, help="timed repetitions of each compared step")
    p.add_argument("--skip-stage2", action="store_true")
    p.add_argument("--skip-data", action="store_true", help="skip the input-pipeline bench (bench/data.py)")
    return p.parse_args()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (1 GPU)"
    return f"CPU: {os.cpu_count()} cores ({platform.machine()}), {torch.get_num_threads()} torch thread(s)"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (trainable weights fp32, frozen towers bf16, as under DeepSpeed bf16); fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def in_autocast(device: torch.device, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with autocast(device):
            return fn()
    return run


def step_memory_gib(device: torch.device, fn: Callable[[], object]) -> Optional[float]:
    """Device memory one call needs on top of what is resident (weights, both models): its
    activations, gradients and workspace, in GiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - resident) / 2**30


def timed(device: torch.device, fns: dict, warmup: int, reps: int) -> tuple[dict, dict]:
    """time_side_by_side, then each function's step memory (`step_memory_gib`)."""
    times = time_side_by_side(fns, warmup, reps, device_sync(device))
    return times, {k: step_memory_gib(device, fn) for k, fn in fns.items()}


def bench_stage1(preset: Preset, device: torch.device, args: argparse.Namespace,
                 backends: list[str]) -> tuple[list[Row], dict]:
    from bench.stage1 import build_stage1_pair, make_stage1_batch, ours_itc_itm, reference_itc_itm

    ours, ref, ref_temp = build_stage1_pair(preset, device)
    batch = make_stage1_batch(preset, device)
    b, t = batch["text_ids"].shape
    step_ours = train_step_fn(ours, in_autocast(device, lambda: ours_itc_itm(ours, batch)))
    step_ref = train_step_fn(ref, in_autocast(device, lambda: reference_itc_itm(ref, ref_temp, batch,
                                                                                  preset.model.max_txt_len)))
    with count_attention_backends() as tally:
        loss_ours = step_ours()
    loss_diff = float((loss_ours.float() - step_ref().float()).abs())
    times, mem = timed(device, {"ours": step_ours, "ref": step_ref}, args.warmup, args.reps)
    rows = [Row("stage1_itc_itm", "stage 1: ViT + ITC + ITM, fwd+bwd", times["ours"], times["ref"],
                sum(stage1_flops(preset.model, b, t, itg=False).values()), b, mem["ours"], loss_diff,
                extra={"ref_step_gib": mem["ref"]})]
    # Our full step once per attention backend, timed side by side: the choice is measured, not assumed.
    def full_step(backend: str) -> Callable[[], torch.Tensor]:
        step = train_step_fn(ours, in_autocast(device, lambda: ours(batch)["loss"]))

        def run() -> torch.Tensor:
            set_attention_(ours, backend)
            return step()
        return run
    fulls = {backend: full_step(backend) for backend in backends}
    used = {}
    for backend, fn in fulls.items():
        with count_attention_backends() as used[backend]:
            fn()
    times, mem = timed(device, fulls, args.warmup, max(5, args.reps // 2))
    for backend in backends:
        vs = median([a / b for a, b in zip(times[backend], times[backends[0]])])
        rows.append(Row(f"stage1_full_{backend}", f"stage 1 full (+ITG), ours only, attention={backend}",
                        times[backend], None, sum(stage1_flops(preset.model, b, t).values()), b, mem[backend],
                        extra={"backend": backend, "attention_calls": dict(used[backend]),
                               "vs_first_backend": vs}))
    set_attention_(ours, "auto")
    reference_attention = {"vit": ref.vision_model.config._attn_implementation,
                           "qformer": ref.qformer.config._attn_implementation}
    del ours, ref, step_ours, step_ref, fulls
    if device.type == "cuda":
        torch.cuda.empty_cache()  # room for the stage-2 pair
    return rows, {"ours": dict(tally), "reference": reference_attention}


def bench_stage2(preset: Preset, device: torch.device, args: argparse.Namespace) -> Row:
    from bench.stage2 import build_stage2_pair, make_stage2_batch, ours_stage2, reference_stage2

    ours, ref = build_stage2_pair(preset, device)
    batch = make_stage2_batch(preset, device)
    step_ours = train_step_fn(ours, in_autocast(device, lambda: ours_stage2(ours, batch)))
    step_ref = train_step_fn(ref, in_autocast(device, lambda: reference_stage2(ref, batch)))
    loss_diff = float((step_ours().float() - step_ref().float()).abs())
    times, mem = timed(device, {"ours": step_ours, "ref": step_ref}, args.warmup, args.reps)
    b, t = batch["llm_input_ids"].shape
    flops = sum(llm_stage_flops(replace(preset.model, arch="stage2"), llm_shape(ours.llm), b, t).values())
    return Row("stage2_opt", "stage 2: ViT + Q-Former + OPT LM loss, fwd+bwd", times["ours"], times["ref"],
               flops, b, mem["ours"], loss_diff, extra={"ref_step_gib": mem["ref"]})


def print_table(rows: list[Row], peak: Optional[float], cuda: bool) -> None:
    """Markdown table: median times, the paired ratio, model FLOPs, ours' throughput (+ MFU, memory on GPU)."""
    head = ["work", "ours ms", "ref ms", "ours/ref", "GFLOP/step", "ours TFLOP/s", "samples/s"]
    head += ["MFU"] if peak else []
    head += ["step GiB ours/ref"] if cuda else []
    lines = [head]
    for r in rows:
        o = median(r.ours_s)
        cells = [r.work, f"{o * 1e3:.1f}", f"{median(r.ref_s) * 1e3:.1f}" if r.ref_s else "-",
                 f"{r.ratio:.3f}" if r.ratio is not None else "-", f"{r.flops / 1e9:.2f}",
                 f"{r.flops / o / 1e12:.3f}", f"{r.samples / o:.1f}"]
        cells += [f"{r.flops / o / peak:.1%}"] if peak else []
        if cuda:
            ref_gib = r.extra.get("ref_step_gib")
            cells.append(f"{r.peak_gib:.2f}" + (f" / {ref_gib:.2f}" if ref_gib is not None else ""))
        lines.append(cells)
    print_markdown_table(lines)


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset or ("gpu" if cuda else "small")]()
    if args.batch_size:
        preset = with_batch(preset, args.batch_size)
    data = None
    if not args.skip_data:
        from bench.data import run_data_bench
        threads = torch.get_num_threads()
        data = run_data_bench()  # one thread per measured pipeline: images/s per core
        torch.set_num_threads(threads)
        print()
    m = preset.model
    print(f"blip-train bench | {datetime.date.today()} | {describe_device(device)} | "
          f"torch {torch.__version__}")
    print(f"preset {preset.name}: batch {preset.batch_size}, text {preset.text_len} tokens; "
          f"ViT {m.vision.image_size}px/{m.vision.patch_size}, width {m.vision.width}, "
          f"{m.vision.layers - int(m.vision.drop_last_block)} blocks; "
          f"Q-Former width {m.qformer.hidden_size}, {m.qformer.layers} layers, {m.qformer.num_query_tokens} queries; "
          f"stage-2 LLM OPT-like width {preset.llm['hidden_size']}, {preset.llm['num_hidden_layers']} layers; "
          f"{'bf16 autocast, frozen towers bf16' if cuda else 'fp32'}; {args.warmup} warmup + {args.reps} timed reps")

    backends = (["flash"] if cuda and flash_available() else []) + ["sdpa"] + ([] if cuda else ["math"])
    rows, attention = bench_stage1(preset, device, args, backends)
    remaining = []
    if not cuda:
        remaining.append("GPU numbers (images/s per GPU, MFU, flash vs SDPA) need a CUDA device: "
                         "python bench/run.py --gpu")
    if cuda and not flash_available():
        remaining.append("flash-attn is not importable here: install the [flash] extra to time attention=flash")
    if args.skip_stage2:
        remaining.append("stage 2 skipped (--skip-stage2)")
    else:
        rows.insert(1, bench_stage2(preset, device, args))
    print(f"attention: ours model.attention=auto -> {dict(attention['ours'])} calls in one ITC+ITM step "
          f"(flash-attn importable: {flash_available()}); reference: ViT {attention['reference']['vit']}, "
          f"Q-Former {attention['reference']['qformer']} (transformers has no other Q-Former attention)")
    for r in rows:
        if "attention_calls" in r.extra:
            print(f"  {r.work}: attention calls {r.extra['attention_calls']}, "
                  f"time {r.extra['vs_first_backend']:.3f}x attention={backends[0]} (paired median)")
        if r.loss_diff is not None:
            print(f"  same work check, {r.work}: |loss ours - loss reference| = {r.loss_diff:.2e}")
    peak = peak_flops(device)  # dense bf16 FLOP/s of this GPU; None on CPU
    print_table(rows, peak, cuda)
    print("times: medians of the timed reps; ours/ref: median of per-rep ratios (each pair ran back to back); "
          "FLOPs: blip_train/training/flops.py, the same count for both sides")
    result = summary(rows, attention, remaining, preset, device, peak)
    if data is not None:
        result["data"] = {"ratios": data["ratios"], "images_per_s_per_core": data["images_per_s_per_core"]}
    print(json.dumps(result))


def summary(rows: list[Row], attention: dict, remaining: list[str], preset: Preset, device: torch.device,
            peak: Optional[float]) -> dict:
    """The closing JSON line; `ratio_vs_reference` is the stage-1 comparison (ours / reference time)."""
    compared = [r for r in rows if r.ratio is not None]
    result = {
        "bench": "blip-train", "date": str(datetime.date.today()), "device": describe_device(device),
        "preset": preset.name, "batch_size": preset.batch_size,
        "ratio_vs_reference": round(compared[0].ratio, 4),
        "ratios": {r.key: round(r.ratio, 4) for r in compared},
        "ours_ms": {r.key: round(median(r.ours_s) * 1e3, 2) for r in rows},
        "reference_ms": {r.key: round(median(r.ref_s) * 1e3, 2) for r in compared},
        "attention": attention, "remaining": remaining,
    }
    if device.type == "cuda":
        full = {r.extra["backend"]: r for r in rows if "backend" in r.extra}
        result["images_per_s_per_gpu"] = {k: round(r.samples / median(r.ours_s), 1) for k, r in full.items()}
        if peak:
            result["mfu"] = {k: round(r.flops / median(r.ours_s) / peak, 4) for k, r in full.items()}
        result["step_gib"] = {r.key: round(r.peak_gib, 3) for r in rows}
    return result


if __name__ == "__main__":
    main()
