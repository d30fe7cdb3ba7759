"""Curves of a run as a picture: loss terms, learning rate and held-out metrics against the step,
from the run's `metrics.jsonl` (one JSON object per logging step or evaluation)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def read_history(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{scalar name: [(step, value), ...]} from metrics.jsonl; a resumed run's later lines win per step."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    lines = Path(path).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a line cut off by a killed run
            raise ValueError(f"{path}: line {n} is not JSON") from None
        step = int(row.pop("step"))
        for key, value in row.items():
            if isinstance(value, (int, float)):
                series[key][step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


PANELS = (("losses", lambda k: k.startswith("train/loss")), ("learning rate", lambda k: k == "train/lr"),
          ("held-out evaluation", lambda k: k.startswith("eval/")),
          ("throughput (samples/s)", lambda k: k == "perf/samples_per_s"))
"""(title, which scalars) of each panel, in order; panels without data are left out."""


def plot_history(history: dict[str, list[tuple[int, float]]], out: str | Path, title: str = "") -> list[str]:
    """Write a PNG with one panel per PANELS entry that has data; returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    panels = [(name, sorted(filter(wanted, history))) for name, wanted in PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        raise ValueError("no training or evaluation scalars to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key.split("/", 1)[-1], marker="o" if len(steps) < 30 else None, ms=3)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [name for name, _ in panels]
