"""The demo's results in README.md, written from the run's summary.json (never typed by hand).

`python -m blip_train.demo` rewrites the block between the two markers after every full run from the
checkout (`--no-readme` leaves README.md alone), so the table always quotes the last run of the code it
sits beside.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN = "<!-- demo results: written by `python -m blip_train.demo` from runs/demo/summary.json; do not edit -->"
END = "<!-- end of demo results -->"


def _num(x: float) -> str:
    return f"{x:.1f}"


def render_results(summary: dict[str, Any]) -> str:
    """The markdown block: how long the run took, one table row per stage, and the summary's shape."""
    # Training time per stage from its own log: a rerun reuses finished stages, so the wall time of the
    # last invocation says nothing about what the stages cost.
    trained = [st.get("train_seconds") for st in summary["stages"].values()]
    when = (f"{sum(trained) / 60:.0f} minutes of training over the {len(trained)} stages"
            if trained and all(t is not None for t in trained) else "training times not recorded")
    lines = [f"A run on this 2-core machine ({when}, `runs/demo/summary.json`):", "",
             "| stage | steps | loss first → last | held-out primary metric | trained | untrained | chance |",
             "|---|---|---|---|---|---|---|"]
    for name, st in summary["stages"].items():
        p = st["metrics"]["primary"]
        lines.append(f"| `{name}` | {st['steps']} | {st['initial_loss']:.2f} → {st['final_loss']:.2f} | "
                     f"{p['name'].replace('->', '→')} | {_num(p['trained'])} | {_num(p['untrained'])} | "
                     f"{_num(p['chance'])} |")
    for key, seeds in (summary.get("seeds") or {}).items():
        lines.append("")
        lines.append(f"Across run.seed {', '.join(map(str, seeds['seeds']))} ({key}): " + "; ".join(
            f"`{n}` trained {_num(r['trained_min'])}–{_num(r['trained_max'])} vs untrained ≤ "
            f"{_num(r['untrained_max'])}, chance {_num(r['chance'])}" for n, r in seeds["stages"].items()))
    first = next(iter(summary["stages"]))
    st = summary["stages"][first]
    p = st["metrics"]["primary"]
    others = ", ".join(f'"{n}": {{...}}' for n in list(summary["stages"])[1:])
    exports = summary.get("export") or {}
    export = ""
    if exports:
        name, ex = next(iter(exports.items()))
        export = (f',\n "export": {{"{name}": {{"class": "{ex["class"]}", "missing_keys": {ex["missing_keys"]}, '
                  f'"unexpected_keys": {ex["unexpected_keys"]}, "generated": {json.dumps(ex["generated"])}}}, ...}}')
    lines += ["", "```json",
              f'{{"stages": {{"{first}": {{"world_size": {st["world_size"]}, "zero_stage": {st["zero_stage"]}, '
              f'"steps": {st["steps"]}, "initial_loss": {st["initial_loss"]:.2f}, "final_loss": {st["final_loss"]:.2f},',
              f'   "checkpoint": "{st["checkpoint"]}",',
              f'   "metrics": {{..., "primary": {{"name": "{p["name"]}", "trained": {_num(p["trained"])}, '
              f'"untrained": {_num(p["untrained"])}, "chance": {p["chance"]:.2f}}}}}}},',
              f"  {others}}}{export}}}", "```"]
    return "\n".join(lines)


def update_readme(readme: Path, summary: dict[str, Any]) -> bool:
    """Replace the block between BEGIN and END in `readme`; False (nothing written) when unchanged."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no demo results block ({BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render_results(summary)}\n{END}{tail}"
    if new == text:
        return False
    readme.write_text(new)
    return True
