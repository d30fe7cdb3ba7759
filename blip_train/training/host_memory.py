"""Host memory of a training process: how glibc keeps it, and where in a run it goes.

At real size a rank's resident memory is dominated by a few large, short-lived host tensors: a tower's
weights read from disk, the pieces of a state dict being partitioned, checkpoint buffers. glibc serves
allocations below its mmap threshold from heaps that it rarely returns to the kernel, and raises that
threshold (up to 32 MiB) each time a large block is freed, so after the model is built a rank can sit on
gigabytes it no longer uses; on a shared node the kernel's OOM killer then stops it. `keep_allocator_lean`
fixes the threshold low so large blocks are mapped and unmapped on their own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import sys
import time
from pathlib import Path

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 128 * 1024
"""Blocks at least this large are mmap'd and returned when freed (glibc's initial value, held fixed)."""


def keep_allocator_lean() -> bool:
    """Fix glibc's mmap and trim thresholds at 128 KiB, as MALLOC_MMAP_THRESHOLD_=131072 would, for this
    process (and the data-loader workers it forks). A threshold the user set in the environment is kept.
    Returns whether glibc took the setting (False off glibc, e.g. macOS or musl)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # Setting either fixes it: glibc stops raising the threshold after large frees.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD))


def rss_gib() -> float:
    """Resident memory of this process now (GiB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    """Most resident memory this process has had (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MemoryTrace:
    """This rank's resident memory at named points of a run (run.memory_trace): one JSON line per mark in
    `path` with the phase, `step` (the engine.step laps so far: optimizer steps without accumulation), seconds
    since the trace began (`t`) and since the epoch (`wall`), the RSS now and the peak so far. A phase whose peak is above the previous mark's
    set a new high-water mark."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.step = 0
        self._t0 = time.perf_counter()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def mark(self, phase: str) -> None:
        if self.path is None:
            return
        if phase == "step":
            self.step += 1
        line = {"phase": phase, "step": self.step, "t": round(time.perf_counter() - self._t0, 3), "wall": time.time(),
                "rss_gib": round(rss_gib(), 4), "peak_gib": round(peak_rss_gib(), 4)}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def read_memory_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
