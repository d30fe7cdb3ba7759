"""Console + TensorBoard logging of flat, namespaced scalars (`train/loss_itc`, `perf/samples_per_s`), and of
the examples (pictures, text) each in-training evaluation shows.

Loss terms, step-phase times and work (tokens, FLOPs) are accumulated locally every step and reduced
across ranks only on logging steps, so the hot path has no extra collectives and no device syncs.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist

from blip_train.distributed.process_group import collective_device
from blip_train.training.flops import WorkCounter, peak_flops
from blip_train.training.host_memory import peak_rss_gib

PHASES = ("data", "forward", "backward", "step")
"""Step-time breakdown: waiting for the batch (and its host→device copy), engine(batch),
engine.backward, engine.step."""


class StepTimer:
    """Time spent per phase, laps marked by the loop: `start()`, then `lap(phase)` after each phase.

    On CUDA the laps are CUDA events on the current stream, so a lap measures when the device got
    through the phase's work, not when the host finished enqueuing it; nothing waits until `totals()`
    (a logging step) synchronizes once. On CPU the clock is `time.perf_counter`.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._marks: list[tuple[str, object]] = []  # (phase ending at this mark, event or time)
        self._host: dict[str, float] = defaultdict(float)
        self._last: float = 0.0
        self.on_lap: Optional[Callable[[str], None]] = None
        """Called with the phase at each lap (the host memory trace)."""

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks.append(("", self._now()))

    def lap(self, phase: str) -> None:
        self._marks.append((phase, self._now()))
        if self.on_lap is not None:
            self.on_lap(phase)

    def totals(self) -> dict[str, float]:
        """Seconds per phase since the last call (a mark without a preceding one opens a new span)."""
        if self.cuda and self._marks:
            self._marks[-1][1].synchronize()  # type: ignore[union-attr]
        out = {p: 0.0 for p in PHASES}
        for (_, a), (phase, b) in zip(self._marks, self._marks[1:]):
            if phase:  # "" marks a start: the gap before it belongs to no phase
                out[phase] += (a.elapsed_time(b) / 1e3) if self.cuda else (b - a)  # type: ignore[union-attr,operator]
        self._marks.clear()
        return out


class MetricLogger:
    def __init__(self, output_dir: Path, is_main: bool, tensorboard: bool, samples_per_step: int, *,
                 count_work: Optional[WorkCounter] = None,
                 device: torch.device = torch.device("cpu"), total_steps: int = 0, wandb_run: Any = None):
        """samples_per_step: global samples per optimizer step; count_work: micro-batch -> (tokens,
        FLOPs) from `flops.build_flops_counter` (None: no tokens/s or MFU); device: the training device;
        total_steps: train.max_steps, for `step N/total` and the ETA (0: not shown); wandb_run: a W&B run
        (`start_wandb`) that gets every scalar too, or None."""
        self.is_main = is_main
        self.wandb_run = wandb_run
        self.total_steps = total_steps
        self._wall_start = time.perf_counter()  # ETA: wall clock including checkpoints and evaluation
        self._wall_step = 0
        self.samples_per_step = samples_per_step
        self.count_work = count_work
        self.device = torch.device(device)
        self.timer = StepTimer(self.device.type == "cuda")
        self.peak_flops = peak_flops(self.device)
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0  # micro-batches since the last log (loss means)
        self._step_at_clock = 0  # optimizer step when the clock last restarted (rates per step)
        self._tokens = 0.0
        self._flops = 0.0
        self._t_last = time.perf_counter()
        self.writer = None
        self.history_path = output_dir / "metrics.jsonl"
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(output_dir / "tb"))

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self._sums[k] += float(v.detach().float())
        self._count += 1

    def add_work(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Count the tokens and model FLOPs of a (host-side) micro-batch."""
        if self.count_work is not None:
            tokens, flops = self.count_work(batch)
            self._tokens += tokens
            self._flops += flops

    @contextmanager
    def paused(self):
        """Time spent inside (checkpointing, evaluation) is left out of the training rates."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._t_last += time.perf_counter() - t0

    def reset_clock(self, step: int = 0) -> None:
        """Start timing at optimizer step `step` (the resumed step, or 0)."""
        self._t_last = self._wall_start = time.perf_counter()
        self._step_at_clock = self._wall_step = step
        self.timer.totals()  # drop laps from before the loop

    def _peak_memory_per_rank(self) -> list[float]:
        """Peak memory (GiB) of every rank: device memory on CUDA, else host RSS. Collective."""
        if self.device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            mine = peak_rss_gib()
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return [mine]
        buf = [torch.zeros(1, dtype=torch.float64, device=collective_device()) for _ in range(dist.get_world_size())]
        dist.all_gather(buf, torch.tensor([mine], dtype=torch.float64, device=collective_device()))
        return [float(t) for t in buf]

    def log(self, step: int, lr: float, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Reduce the accumulated means across ranks and write them (rank 0). Collective: call on all ranks."""
        phases = self.timer.totals()  # synchronizes the device once (CUDA)
        now = time.perf_counter()
        elapsed = max(now - self._t_last, 1e-9)
        micro = max(1, self._count)
        steps = max(1, step - self._step_at_clock)  # optimizer steps: each is grad_accum_steps micro-batches
        achieved = self._flops / elapsed  # this rank's model FLOP/s
        keys = sorted(self._sums)
        local = ([self._sums[k] / micro for k in keys] + [phases[p] for p in PHASES]
                 + [self._tokens / elapsed, achieved, achieved / self.peak_flops if self.peak_flops else 0.0])
        vals = torch.tensor(local, dtype=torch.float64, device=collective_device())
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(vals)
            vals /= world  # means over ranks (tokens/s is scaled back to a sum below)
        vals = vals.cpu().tolist()
        n = len(keys)
        scalars = {f"train/{k}": v for k, v in zip(keys, vals[:n])}
        scalars["train/lr"] = lr
        scalars["perf/step_time_s"] = elapsed / steps
        scalars["perf/samples_per_s"] = self.samples_per_step * steps / elapsed
        scalars["perf/samples_per_s_per_rank"] = scalars["perf/samples_per_s"] / world
        for p, v in zip(PHASES, vals[n:n + len(PHASES)]):
            scalars[f"perf/time_{p}_s"] = v / steps
        scalars["perf/data_wait_frac"] = vals[n] / elapsed
        tokens_s, flops_s, mfu = vals[n + len(PHASES):]
        if self.count_work is not None:
            scalars["perf/tokens_per_s"] = tokens_s * world
            scalars["perf/tflops_per_rank"] = flops_s / 1e12
            if self.peak_flops:
                scalars["perf/mfu"] = mfu
        peaks = self._peak_memory_per_rank()
        scalars["perf/peak_mem_gib"] = max(peaks)  # device memory on CUDA, host RSS on CPU
        scalars.update({f"mem/peak_gib_rank{r}": v for r, v in enumerate(peaks)})
        scalars.update(extra or {})
        wall = now - self._wall_start
        scalars["time/elapsed_s"] = wall
        if self.total_steps and step > self._wall_step:
            scalars["time/eta_s"] = wall / (step - self._wall_step) * max(0, self.total_steps - step)
        if self.is_main:
            self._print(step, lr, scalars)
            self.log_scalars(step, scalars)
        self._sums.clear()
        self._count = 0
        self._tokens = self._flops = 0.0
        self._t_last = now
        self._step_at_clock = step
        return scalars

    def _print(self, step: int, lr: float, s: dict[str, float]) -> None:
        loss_txt = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in s.items() if k.startswith("train/loss"))
        split = "/".join(f"{s[f'perf/time_{p}_s'] * 1000:.0f}" for p in PHASES)
        work = ""
        if "perf/tokens_per_s" in s:
            work = f" | {s['perf/tokens_per_s']:.0f} tok/s | {s['perf/tflops_per_rank']:.3g} TFLOP/s/rank"
            work += f" | MFU {s['perf/mfu']:.1%}" if "perf/mfu" in s else ""
        from blip_train.training.console import format_duration

        where = f"{step}/{self.total_steps}" if self.total_steps else f"{step}"
        clock = f"elapsed {format_duration(s['time/elapsed_s'])}"
        if "time/eta_s" in s:
            clock += f" ETA {format_duration(s['time/eta_s'])}"
        print(f"step {where} | {loss_txt} | lr {lr:.3e} | {s['perf/samples_per_s']:.1f} samples/s | "
              f"{s['perf/step_time_s'] * 1000:.0f} ms/step (data/fwd/bwd/step {split}){work} | "
              f"peak mem {s['perf/peak_mem_gib']:.2f} GiB | {clock}", flush=True)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.is_main:
            if self.writer is not None:
                for k, v in scalars.items():
                    self.writer.add_scalar(k, v, step)
                self.writer.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(scalars, step=step)
            with open(self.history_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def log_examples(self, step: int, examples: Mapping[str, Any]) -> None:
        """TensorBoard (rank 0): each {tag: picture (H, W, 3) uint8 array, or markdown text} at `step`."""
        if self.writer is None:
            return
        for tag, value in examples.items():
            if isinstance(value, str):
                self.writer.add_text(tag, value, step)
            else:
                self.writer.add_image(tag, value, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(output_dir: Path, project: str, config: dict) -> Any:
    """A W&B run for this output directory: its id is kept in output_dir/wandb_id, so a resumed run
    continues the same W&B run (steps logged again after a resume replace nothing: W&B keeps the first)."""
    import wandb

    id_file = output_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=project, name=output_dir.name, id=run_id, resume="allow", dir=str(output_dir),
                      config=config)
