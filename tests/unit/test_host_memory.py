"""Host memory: glibc returns large freed blocks, and the memory trace records what a phase allocated."""
from __future__ import annotations

import subprocess
import sys

from blip_train.training.host_memory import MemoryTrace, read_memory_trace

RETURNED = """
import sys, torch
from blip_train.training.host_memory import keep_allocator_lean, rss_gib
lean = sys.argv[1] == "lean"
if lean:
    assert keep_allocator_lean()
# Freeing one large mapped block makes default glibc raise its mmap threshold to that size, so the 1 MiB
# blocks after it come from the heap, which cannot shrink below the live block at its top.
torch.ones(16 * 2**18)  # 16 MiB, freed at once
base = rss_gib()
blocks = [torch.ones(2**18) for _ in range(700)]  # 700 x 1 MiB
keep = blocks[-1]
del blocks
print(rss_gib() - base)
"""


def _retained_gib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", RETURNED, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def test_lean_allocator_gives_freed_blocks_back() -> None:
    # 0.68 GiB freed: kept by the default heap, given back with the threshold fixed at 128 KiB.
    default, lean = _retained_gib("default"), _retained_gib("lean")
    print(f"retained after free: default {default:.3f} GiB, lean {lean:.3f} GiB")
    assert default > 0.5
    assert lean < 0.1


def test_memory_trace_records_phases_and_a_rising_peak(tmp_path) -> None:
    import torch

    trace = MemoryTrace(tmp_path / "memory" / "rank0.jsonl")
    trace.mark("start")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    trace.mark("forward")
    del big
    trace.mark("step")
    rows = read_memory_trace(tmp_path / "memory" / "rank0.jsonl")
    assert [(r["phase"], r["step"]) for r in rows] == [("start", 0), ("forward", 0), ("step", 1)]
    assert rows[1]["rss_gib"] - rows[0]["rss_gib"] > 0.2  # the 256 MiB are resident while held
    # The peak is the process's high-water mark (which earlier work in this process may already hold above).
    assert rows[1]["peak_gib"] >= rows[1]["rss_gib"] - 1e-3 and [r["peak_gib"] for r in rows] == sorted(
        r["peak_gib"] for r in rows)
    MemoryTrace(None).mark("start")  # off: writes nothing, fails nothing
