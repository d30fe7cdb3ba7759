"""The demo's child processes: every step runs as a user would run it, from the checkout, its output streamed."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(cmd: list[str]) -> str:
    """Run a child command, stream its output, fail loudly; returns the output."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not any(noise in line for noise in ("[INFO]", "[WARNING]", "warnings.warn", "Warning:", "return func(")):
            print("    " + line, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"demo step failed (exit {proc.returncode}): {' '.join(cmd)}")
    return "".join(lines)


def last_json_line(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("expected a JSON line of metrics at the end of the output")
