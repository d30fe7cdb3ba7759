"""`make scale`'s runs: each recipe launched on 2 ranks, its memory trace summarised, the tools run at real
size, and the table."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import bench.scale
from bench.common import print_markdown_table
from bench.scale.model import (BLIP_ARCHS, GIB, RECIPES, WORLD, Recipe, count_footprint, model_config, plan,
                               target_gib)
from bench.scale.towers import make_data, make_modality_data, make_towers

REPO = Path(__file__).resolve().parents[2]


class PeakSampler:
    """Peak RSS of a process tree (VmHWM of each process, polled), for the tools (which trace nothing)."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, frontier = [self.pid], [self.pid]
        while frontier:
            p = frontier.pop()
            try:
                kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            except OSError:
                continue
            pids += [int(k) for k in kids]
            frontier += [int(k) for k in kids]
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self._tree():
                try:
                    for line in Path(f"/proc/{p}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                except OSError:
                    pass
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 2**20


def run_logged(cmd: list[str], log_file: Path, env: dict, timeout: int, started: Optional[list] = None
               ) -> tuple[float, float]:
    """Run `cmd` (output to log_file); returns (seconds, peak RSS GiB of its busiest process). `started`
    gets the launch time appended."""
    t0 = time.time()
    if started is not None:
        started.append(t0)
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = PeakSampler(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            peak = sampler.stop()
    if rc != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{cmd[:4]}... exited {rc}; end of {log_file}:\n{tail}")
    return time.time() - t0, peak


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # the project sets its own
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    return env


def free_port() -> int:
    from blip_train.distributed.env import free_port as _free
    return _free()


def summarise_trace(run_dir: Path, world: int = WORLD) -> dict:
    """Over the ranks: the baseline (RSS at start), the peak, the phases that raised the high-water mark by
    more than 50 MiB (phase group -> the peak it raised it to), build/engine seconds and the median step."""
    from blip_train.training.host_memory import read_memory_trace

    groups = {"start": "baseline", "built": "build+load", "engine": "engine", "resumed": "resume",
              "data": "data", "forward": "forward", "backward": "backward", "step": "optimizer", "saved": "save"}
    out: dict = {"high_water_gib": {}, "baseline_gib": 0.0, "peak_gib": 0.0}
    step_times = []
    for r in range(world):
        trace = read_memory_trace(run_dir / "memory" / f"rank{r}.jsonl")
        prev = 0.0
        for m in trace:
            if m["peak_gib"] - prev > 0.05:
                g = groups[m["phase"]]
                out["high_water_gib"][g] = max(out["high_water_gib"].get(g, 0.0), m["peak_gib"])
            prev = max(prev, m["peak_gib"])
        out["baseline_gib"] = max(out["baseline_gib"], trace[0]["rss_gib"])
        out["start_wall"] = max(out.get("start_wall", 0.0), trace[0].get("wall", 0.0))
        out["peak_gib"] = max(out["peak_gib"], prev)
        t = {m["phase"]: m["t"] for m in trace if m["phase"] in ("start", "built", "engine", "resumed")}
        out.setdefault("build_s", round(t["built"] - t["start"], 1))
        out.setdefault("engine_s", round(t["engine"] - t["built"], 1))
        starts = [m["t"] for m in trace if m["phase"] == "data"]
        ends = [m["t"] for m in trace if m["phase"] == "step"]
        step_times += [b - a for a, b in zip(starts, ends)]
    out["step_s"] = round(sorted(step_times)[len(step_times) // 2], 2) if step_times else None
    return out


def du_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB


def run_recipe(root: Path, recipe: Recipe, towers: dict, data: Path, log, sets: list[str], res: dict,
               nvme: Optional[Path] = None) -> None:
    """Train + save, consolidate, resume one step, export (BLIP-2 archs only, for now); fills `res` as it goes
    (kept when a step fails).
    nvme: every ZeRO-3 partition swapped to files in this directory, one step of micro-batch 1 and no tools
    (the point is the step of a recipe whose towers do not fit in memory)."""
    run_dir = root / "runs" / recipe.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    logf = run_dir.parent / f"{recipe.name}.log"
    logf.write_text("")
    init_from = ""
    stage1 = root / "runs" / "blip2_stage1_vitg"
    if recipe.llm is not None and (stage1 / "checkpoints").is_dir() and recipe.vit == "g":
        init_from = str(stage1)  # a stage-1 checkpoint at real size, as the recipes chain them
    arch = model_config(recipe.name).arch
    if arch in BLIP_ARCHS:
        # BERT-base is the text transformer. The fine-tuning recipes start from a pretraining run, which does not
        # exist here: they start from the ImageNet ViT and BERT instead (the same shapes).
        text = [f"model.text.tokenizer={towers['bert']}", f"model.text.bert_init={towers['bert']}",
                "model.init_from="]
    else:
        text = [f"model.qformer.tokenizer={towers['bert']}", f"model.qformer.bert_init={towers['bert']}",
                f"model.init_from={init_from}"]
    overrides = [
        f"run.output_dir={run_dir}", "run.device=cpu", "run.tensorboard=false", "run.memory_trace=true",
        f"model.vision.weights={towers['vit']}", *text,
        f"data.train=[{{local: {data / 'train'}, name: synthetic}}]", f"data.val={data / 'val'}",
        "data.num_workers=1", "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.global_batch_size=0",
        "train.max_steps=2", "train.save_interval=2", "train.log_interval=1", "eval.interval=0",
        "optim.warmup_steps=1",
        # The recipes' optim.fused=auto picks the fused AdamW on a GPU; on a CPU only `on` does, and without it
        # the step's full-size temporaries (0.7 GiB per rank for stage 1) would be measured, not the GPU's.
        "optim.fused=on",
    ] + sets
    if recipe.llm is not None:
        overrides.append(f"model.llm.path={towers['llm']}")
    if recipe.encoder is not None:  # X-InstructBLIP: the modality's encoder and data instead of the ViT's
        key = "model.audio.encoder" if recipe.encoder == "ast" else "model.points.encoder"
        own = make_modality_data(root, recipe.encoder)
        overrides += [f"{key}={towers['encoder']}", f"data.train=[{{local: {own / 'train'}, name: {own.name}}}]",
                      f"data.val={own / 'val'}"]
    if nvme is not None:
        shutil.rmtree(nvme, ignore_errors=True)
        nvme.mkdir(parents=True)
        overrides += ["deepspeed.config=zero3_offload_nvme", "deepspeed.offload_frozen=true",
                      "deepspeed.offload_device=nvme", f"deepspeed.nvme_path={nvme}", "train.micro_batch_size=1",
                      "train.max_steps=1", "train.save_interval=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), "-m", "blip_train.train", "--config", recipe.name]
    for s in overrides:
        cmd += ["--set", s]
    env = child_env()
    res.update(arch=arch, llm_layers=recipe.llm_layers, init_from=init_from or None)
    log(f"{recipe.name}: training 2 steps on {WORLD} ranks")
    launched: list = []
    res["train_s"], _ = run_logged(cmd, logf, env, timeout=3600, started=launched)
    res["train"] = summarise_trace(run_dir)
    res["train"]["startup_s"] = round(res["train"]["start_wall"] - launched[0], 1)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    res["checkpoint_gib"] = round(du_gib(ckpts[-1]), 3)
    if nvme is not None:
        res["nvme_gib"] = round(du_gib(nvme), 3)
        shutil.rmtree(nvme, ignore_errors=True)
        return
    log(f"{recipe.name}: zero_to_safetensors")
    weights = root / "weights" / recipe.name
    shutil.rmtree(weights, ignore_errors=True)
    res["z2s_s"], res["z2s_peak_gib"] = run_logged(
        [sys.executable, "tools/zero_to_safetensors.py", "--checkpoint", str(run_dir), "--out", str(weights)],
        logf, env, timeout=1800)
    res["weights_gib"] = round(du_gib(weights), 3)
    log(f"{recipe.name}: resuming for one more step")
    # Extending a run is a meaning change the trainer refuses unless asked.
    cmd_resume = [c if not c.startswith("train.max_steps=") else "train.max_steps=3" for c in cmd]
    cmd_resume.append("--allow-config-change")
    cmd_resume[cmd_resume.index("--master_port") + 1] = str(free_port())
    (run_dir / "memory").rename(run_dir / "memory_first")
    res["resume_s"], _ = run_logged(cmd_resume, logf, env, timeout=3600)
    res["resume"] = summarise_trace(run_dir)
    res["resumed_to"] = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))[-1]
    if arch == "albef":  # transformers has no ALBEF class; BLIP exports (BlipForImageTextRetrieval by default)
        res["export_skipped"] = "transformers has no ALBEF class"
        shutil.rmtree(weights, ignore_errors=True)
        return
    log(f"{recipe.name}: export_hf")
    export = root / "exports" / recipe.name
    shutil.rmtree(export, ignore_errors=True)
    res["export_s"], res["export_peak_gib"] = run_logged(
        [sys.executable, "tools/export_hf.py", "--checkpoint", str(run_dir), "--out", str(export), "--dtype", "bf16"],
        logf, env, timeout=3600)
    res["export_gib"] = round(du_gib(export), 3)
    shutil.rmtree(export, ignore_errors=True)  # tens of GB at the larger sizes
    shutil.rmtree(weights, ignore_errors=True)


def machine_budget_bytes() -> float:
    """Memory the two ranks may use: MemAvailable now, less 2 GiB for the data workers and the tools."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 - 2 * GIB
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=bench.scale.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--towers", default="runs/scale/towers", help="where the random towers are built (reused)")
    p.add_argument("--recipes", default="", help="comma-separated recipe names (default: all)")
    p.add_argument("--list", action="store_true", help="print the plan (sizes, minimum, what fits) and stop")
    p.add_argument("--baseline-gib", type=float, default=0.95,
                   help="per-rank baseline assumed when planning (measured values are reported)")
    p.add_argument("--nvme", default="",
                   help="directory on a local disk: run the chosen recipes at full size with every ZeRO-3 partition "
                        "swapped there (deepspeed.offload_device=nvme), one step, no tools")
    p.add_argument("--budget-gib", type=float, default=0.0,
                   help="memory both ranks may use together (default: what the kernel reports available, less 2 GiB)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every run")
    args = p.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = sorted(set(names) - {r.name for r in RECIPES})
    if unknown:
        print(f"--recipes: unknown {unknown}; known: {', '.join(r.name for r in RECIPES)}", file=sys.stderr)
        return 2
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    chosen = [r for r in RECIPES if not names or r.name in names]
    if args.nvme:  # the towers live on disk: every recipe at full size
        planned = [(r, count_footprint(r)[0], f"full size, partitions swapped to {args.nvme}") for r in chosen]
    else:
        planned = plan(chosen, args.baseline_gib, args.budget_gib * GIB or machine_budget_bytes())
    for r, fp, why in planned:
        extra = (f" (momentum fp32 {fp.momentum / 1e6:.1f}M, buffers {fp.buffer_bytes / GIB:.2f} GiB)"
                 if fp.momentum else "")
        log(f"{r.name:<24} trainable {fp.trainable / 1e6:7.1f}M frozen {fp.frozen / 1e6:8.1f}M{extra} "
            f"ZeRO-{fp.zero_stage} minimum {fp.minimum_per_rank() / GIB:5.2f} GiB/rank — {why}")
    if args.list:
        return 0
    data = make_data(root)
    results_file = root / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for r, fp, why in planned:
        if why.startswith("skipped"):
            results[r.name] = {"recipe": r.name, "skipped": why}
            continue
        towers = make_towers(Path(args.towers), r, log)
        res: dict = {"recipe": r.name}
        try:
            run_recipe(root, r, towers, data, log, args.sets, res, Path(args.nvme) if args.nvme else None)
        except RuntimeError as e:
            log(f"{r.name}: FAILED — {str(e).splitlines()[0]}")
            res["failed"] = str(e)[-2000:]
        # Swapped to disk, the 16-bit weights and gradients leave memory: what must stay is the fp32 master,
        # its gradient and Adam's moments (16 bytes per trainable parameter).
        minimum = (16 * fp.trainable / WORLD) if args.nvme else fp.minimum_per_rank()
        res.update(plan=why, trainable=fp.trainable, frozen=fp.frozen, frozen_bytes=fp.frozen_bytes,
                   momentum=fp.momentum, buffer_bytes=fp.buffer_bytes, zero_stage=3 if args.nvme else fp.zero_stage,
                   paper_trainable=r.paper_trainable, minimum_gib=round(minimum / GIB, 3))
        if "train" in res:
            base = res["train"]["baseline_gib"]
            res["target_gib"] = round(target_gib(res["minimum_gib"], base), 3)
            res["ratio_to_min_plus_baseline"] = round(res["train"]["peak_gib"] / (res["minimum_gib"] + base), 3)
            res["within_target"] = res["train"]["peak_gib"] <= res["target_gib"]
        results[r.name + (" (nvme)" if args.nvme else "")] = res
        results_file.write_text(json.dumps(results, indent=2))
    report(results)
    return 0


def report(results: dict) -> None:
    rows = []
    for name, r in results.items():
        if "train" not in r:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", "-", r.get("skipped") or "FAILED"])
            continue
        t = r["train"]
        phases = t["high_water_gib"]
        tools = (f"z2s {r['z2s_s']:.0f}s, resume→{r['resumed_to']}, export {r['export_s']:.0f}s" if "export_s" in r
                 else f"z2s {r['z2s_s']:.0f}s, resume→{r['resumed_to']}, {r['export_skipped']}"
                 if "export_skipped" in r else f"{r['nvme_gib']:.1f} GiB swapped to disk" if "nvme_gib" in r else "-")
        rows.append([
            name + (f" ({r['llm_layers']} LLM layers)" if r.get("llm_layers") else ""),
            f"{r['trainable'] / 1e6:.1f}M / {r['frozen'] / 1e6:.0f}M",
            f"{t.get('startup_s', 0):.0f} + {t['build_s']:.0f} + {t['engine_s']:.0f}",
            f"{t['step_s']:.1f}",
            f"{t['peak_gib']:.2f}",
            f"{r['minimum_gib']:.2f} + {t['baseline_gib']:.2f}",
            f"{r['ratio_to_min_plus_baseline']:.2f}x" + ("" if r["within_target"] else " (over 1.3)"),
            ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
            f"{r['checkpoint_gib']:.2f}",
            tools,
        ])
    print_markdown_table([["recipe", "trainable / frozen", "start-up + build + engine s", "step s", "peak GiB/rank",
                           "min + baseline", "peak / (min+base)", "high-water by phase (GiB)", "ckpt GiB",
                           "tools"]] + rows)
    line = {name: {k: r.get(k) for k in ("trainable", "frozen", "minimum_gib", "ratio_to_min_plus_baseline",
                                          "within_target", "checkpoint_gib", "llm_layers", "skipped")}
            | ({"peak_gib": r["train"]["peak_gib"], "baseline_gib": r["train"]["baseline_gib"],
                "step_s": r["train"]["step_s"]} if "train" in r else {}) for name, r in results.items()}
    print(json.dumps({"bench": "scale", "world": WORLD, "recipes": line}))


if __name__ == "__main__":
    sys.exit(main())
