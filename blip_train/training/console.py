"""What a person watching the run sees: rank 0's console mirrored to `train.log`, progress wording, and
DeepSpeed's start-up chatter (lines nobody can act on) kept off the console."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO


class _Tee(io.TextIOBase):
    """Writes to the console stream and to a log file (flushed per write: a killed run keeps its log)."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()


@contextlib.contextmanager
def mirror_console(path: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Inside, stdout and stderr also go to `path` (appended: a resumed run continues the same log)."""
    if not enabled:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def quiet_deepspeed(device_type: str) -> None:
    """Silence what DeepSpeed and torch print at start-up that a user can do nothing about.

    - naming the accelerator ourselves skips DeepSpeed's "Setting accelerator to CPU ... unable to
      detect" warning (run.device already decided it);
    - torch's "No CUDA runtime is found" (DeepSpeed's op builders import cpp_extension on CPU hosts);
    - DeepSpeed's INFO lines (config dumps, op loading). Its warnings and errors stay.
    """
    os.environ.setdefault("DS_ACCELERATOR", device_type)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger
    except ImportError:
        return
    ds_logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def without_build_chatter() -> Iterator[None]:
    """Drop DeepSpeed's "<op> built successfully" lines (printed while the process group starts); other
    output passes through."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        for line in captured.getvalue().splitlines():
            if not line.endswith("built successfully"):
                print(line, flush=True)


def format_duration(seconds: float) -> str:
    """12:34:56 (or 3d 04:05:06 past a day)."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{h:02d}:{m:02d}:{s:02d}"
