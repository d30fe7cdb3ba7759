"""Console + TensorBoard logging of flat, namespaced scalars (`train/loss_itc`, `perf/samples_per_s`).

Loss terms are accumulated locally every step and reduced across ranks only on logging steps, so the
hot path has no extra collectives.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist


class MetricLogger:
    def __init__(self, output_dir: Path, is_main: bool, tensorboard: bool, samples_per_step: int):
        self.is_main = is_main
        self.samples_per_step = samples_per_step
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._t_last = time.perf_counter()
        self._data_wait = 0.0
        self.writer = None
        self.history_path = output_dir / "metrics.jsonl"
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(output_dir / "tb"))

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self._sums[k] += float(v.detach().float())
        self._count += 1

    def add_data_wait(self, seconds: float) -> None:
        self._data_wait += seconds

    def reset_clock(self) -> None:
        self._t_last = time.perf_counter()

    def log(self, step: int, lr: float, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Reduce the accumulated means across ranks and write them (rank 0). Collective: call on all ranks."""
        keys = sorted(self._sums)
        vals = torch.tensor([self._sums[k] / max(1, self._count) for k in keys] + [self._data_wait], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vals)
            vals /= dist.get_world_size()
        now = time.perf_counter()
        elapsed = max(now - self._t_last, 1e-9)
        steps = max(1, self._count)
        scalars = {f"train/{k}": float(v) for k, v in zip(keys, vals[:-1])}
        scalars["train/lr"] = lr
        scalars["perf/step_time_s"] = elapsed / steps
        scalars["perf/samples_per_s"] = self.samples_per_step * steps / elapsed
        scalars["perf/data_wait_frac"] = float(vals[-1]) / elapsed
        if torch.cuda.is_available():
            scalars["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        scalars.update(extra or {})
        if self.is_main:
            loss_txt = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in scalars.items() if k.startswith("train/loss"))
            print(f"step {step:>7d} | {loss_txt} | lr {lr:.3e} | {scalars['perf/samples_per_s']:.1f} samples/s | "
                  f"{scalars['perf/step_time_s'] * 1000:.0f} ms/step | data wait {scalars['perf/data_wait_frac']:.0%}",
                  flush=True)
            if self.writer is not None:
                for k, v in scalars.items():
                    self.writer.add_scalar(k, v, step)
                self.writer.flush()
            with open(self.history_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        self._sums.clear()
        self._count = 0
        self._data_wait = 0.0
        self._t_last = now
        return scalars

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.is_main:
            if self.writer is not None:
                for k, v in scalars.items():
                    self.writer.add_scalar(k, v, step)
                self.writer.flush()
            with open(self.history_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
