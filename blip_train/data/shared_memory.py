"""Streaming's shared memory on a node: find and remove what killed runs left, and register new datasets one
job at a time.

Streaming names a dataset's shared-memory segments `<prefix>_<name>` with a node-wide counter: the first
rank of each node scans /dev/shm for the first free prefix, the other ranks of the node scan too, then the
first rank creates the segments and the others attach by name. Two jobs on one node that build a dataset
at the same moment pick the same prefix: one dies with `FileExistsError: '/002648_locals'`, or worse, a
rank attaches to the other job's segments. On shared nodes jobs do start together (a requeue after a
preemption restarts several at once), so every streaming dataset here is built under
`streaming_registration()`: one job of ours at a time per node scans, creates and attaches.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch.distributed as dist
from streaming.base.constant import SHM_TO_CLEAN
from streaming.base.shared.memory import SharedMemory

logger = logging.getLogger(__name__)

_shm_cleaned = False
T = TypeVar("T")

SHM_DIR = Path("/dev/shm")
_STREAMING_SHM = re.compile(r"^(\d{6,})_(%s)$" % "|".join(SHM_TO_CLEAN))
"""Streaming's segments: `<prefix>_<name>`, one prefix per live dataset of a node (streaming/base/shared)."""


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that a live process maps or holds open, among the processes visible here."""
    names: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    names.add(line.split("/dev/shm/", 1)[1].split(" ", 1)[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    names.add(target[len("/dev/shm/"):].split(" ", 1)[0])
        except OSError:  # the process ended meanwhile, or belongs to another user
            continue
    return names


def stale_streaming_segments(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Streaming segments that no live process uses: a prefix is stale when none of its segments is mapped or
    open by any process, and every one of them is ours.

    Streaming names segments by a node-wide counter, not by job, and creates them readable by their owner
    only: a segment of ours can only be held by our own processes, all of which /proc shows us (a job in
    another PID namespace that shares /dev/shm would not be seen). Another user's segments are never ours
    to remove.
    """
    by_prefix: dict[str, list[Path]] = {}
    for path in shm_dir.iterdir() if shm_dir.is_dir() else ():
        m = _STREAMING_SHM.match(path.name)
        if m:
            by_prefix.setdefault(m.group(1), []).append(path)
    if not by_prefix:
        return []
    in_use, uid = _shm_in_use(), os.geteuid()
    stale = []
    for paths in by_prefix.values():
        try:
            ours = all(p.stat().st_uid == uid for p in paths)
        except FileNotFoundError:  # its job is cleaning up right now
            continue
        if ours and not any(p.name in in_use for p in paths):
            stale += paths
    return sorted(stale)


def maybe_clean_stale_shared_memory() -> None:
    """Remove streaming's shared memory that killed runs left behind, once per process (later calls do nothing).

    Replaces streaming's `clean_stale_shared_memory()`, which unlinks every streaming segment on the node,
    a live neighbour's included (its readers then attach to the next job's segments by name). Only stale
    segments go (`stale_streaming_segments`). One process per node cleans (streaming's local leader), and
    all ranks wait for it, so no rank picks its prefix from a view that is about to change.
    """
    global _shm_cleaned
    if _shm_cleaned:
        return
    from streaming.base.distributed import get_local_world_size, get_rank, maybe_init_dist

    destroy = maybe_init_dist()
    try:
        if get_rank() % get_local_world_size() == 0:
            for path in stale_streaming_segments():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        if destroy:
            dist.destroy_process_group()
    _shm_cleaned = True



LOCK_NAME = "blip_train_streaming.lock"
"""In /dev/shm: node-local wherever the segments are, and not a name streaming's scan matches."""


def _open_lock(shm_dir: Path) -> int:
    """The node's lock file, created readable and writable by every user (another user's job shares the node's
    segment counter); flock works on a read-only descriptor when another user created it."""
    path = shm_dir / LOCK_NAME if shm_dir.is_dir() else Path("/tmp") / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # the umask trimmed it
        return fd
    except PermissionError:
        return os.open(path, os.O_RDONLY)


@contextlib.contextmanager
def streaming_registration(shm_dir: Path = SHM_DIR, wait_log_s: float = 60.0) -> Iterator[None]:
    """Hold this node's streaming lock, for this job, while the body builds a streaming dataset.

    A collective when a process group exists (streaming's own construction is one). The first rank of each
    node takes its node's lock without blocking; the ranks agree (an all-reduce) whether every node's was
    taken, and otherwise release and retry after a random pause: a job holding one node and waiting on
    another while a second job does the reverse would deadlock, blocking. The random pause comes from the
    OS, not from the RNGs that training checkpoints.
    """
    from streaming.base.distributed import get_local_world_size, get_rank, get_world_size

    from blip_train.distributed.process_group import all_reduce_max_bool

    grouped = dist.is_available() and dist.is_initialized()
    if not grouped and get_world_size() > 1:  # ranks that cannot agree: streaming on its own, as before
        yield
        return
    leader = get_rank() % get_local_world_size() == 0
    fd = _open_lock(shm_dir) if leader else -1
    pause, started, warned, rng = 0.02, time.monotonic(), False, random.SystemRandom()
    try:
        while True:
            held = True
            if leader:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if grouped else 0))
                except BlockingIOError:
                    held = False
            if not (all_reduce_max_bool(not held) if grouped else not held):
                break
            if leader and held:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if not warned and time.monotonic() - started > wait_log_s:
                logger.warning("still waiting for other jobs on this node to register their streaming datasets "
                               "(%s)", shm_dir / LOCK_NAME)
                warned = True
            time.sleep(rng.uniform(0, pause))
            pause = min(2 * pause, 1.0)
        try:
            yield
        finally:
            if grouped:
                dist.barrier()  # every rank has attached before the next job may scan
    finally:
        if leader:
            os.close(fd)  # releases the lock


def build_streaming_dataset(build: Callable[[], T]) -> T:
    """`build()` (a streaming dataset's constructor call) after removing stale segments, both under this node's
    streaming lock (`streaming_registration`): use it for every streaming dataset a rank opens."""
    with streaming_registration():
        maybe_clean_stale_shared_memory()
        return build()


def _open_segments() -> dict[int, SharedMemory]:
    """Every streaming shared-memory handle alive in this process: streaming's atexit handler holds each one
    until the process exits, so none is ever freed (and no id is reused) before `_release`."""
    # `type`, not isinstance: isinstance would wake torch's deprecated module proxies, which warn
    return {id(o): o for o in gc.get_objects() if type(o) is SharedMemory}


def _release(segment: SharedMemory) -> None:
    try:
        segment.cleanup()  # closes it; unlinks it where this process created it
    except BufferError:  # a numpy view of it is still alive: streaming's exit handler closes it then
        return
    atexit.unregister(segment.cleanup)


@contextlib.contextmanager
def releasing_streaming_memory() -> Iterator[None]:
    """Close every streaming shared-memory segment the body opened when it ends (and unlink those it created).

    Streaming keeps a dataset's segments, and two descriptors for each, until the process exits, however
    early the dataset is dropped: its prefix scan also attaches to every other live dataset's. A run that
    opens its validation split at each evaluation (one an hour for weeks) would pile up descriptors until
    `Too many open files` kills it, and /dev/shm segments with them. Wrap work that opens datasets it does
    not return, and use none of them afterwards. Unlinking by the node's first rank is safe while other
    ranks still read: they attached by name when the dataset was built, and a mapping outlives its name.
    """
    before = _open_segments().keys()
    try:
        yield
    finally:
        for key, segment in _open_segments().items():
            if key not in before:
                _release(segment)
