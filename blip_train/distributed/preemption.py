"""Turn SLURM's preemption signal, SIGTERM and Ctrl-C into a stop flag that every rank agrees on at a step
boundary.

Flow (see slurm/README.md): SLURM sends USR1 to the batch shell 180 s before the time limit; the shell
forwards it to the job step, so each task's handler sets a local flag. Not every rank gets the signal
at the same instant (or at all), so the trainer asks `should_stop()` once per step: an all-reduce MAX
of the flags, after which all ranks save the same checkpoint and exit together.

The handler only sets a flag and writes one line with os.write: a Python-level print or logging call
inside a handler can raise "reentrant call" if the signal lands while the main thread is printing,
and raising from a handler could corrupt a checkpoint being written. A second USR1/TERM is harmless.

Ctrl-C (SIGINT) asks for the same save-and-stop; a second Ctrl-C aborts at once (the newest complete
checkpoint stays the resume point: a half-written one is never used). One keypress often arrives twice
(the terminal signals the whole process group and torchrun forwards SIGINT to its workers), so a
repeat within `SIGINT_REPEAT_S` counts as the same keypress. Processes forked after `install` (data
loader workers) inherit the handler and ignore these signals: only the trainer decides when to stop.
The resource tracker, exec'd rather than forked, is started with USR1 ignored (`start_resource_tracker`).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType
from typing import Any, Callable, Dict, Optional, Sequence, Union

from blip_train.distributed.process_group import all_reduce_max_bool, get_rank

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]

SIGINT_REPEAT_S = 2.0
"""A second SIGINT sooner than this after the first is the same Ctrl-C delivered twice."""
ABORT_EXIT_CODE = 130


def start_resource_tracker(ignored: Sequence[int] = (signal.SIGUSR1,)) -> None:
    """Start multiprocessing's resource tracker now, with `ignored` signals ignored, unless it already runs.

    Streaming's shared memory registers with the tracker, a helper process that unlinks the segments when the
    trainer dies. SLURM relays a preemption USR1 to every process of the job step, the tracker included, whose
    default action for it is to die: the segments would then leak ("resource_tracker: process died
    unexpectedly") and the relaunched tracker raises KeyError tracebacks for segments it never saw. The tracker
    is exec'd, so a Python handler would not follow it there, but an ignored signal stays ignored across exec.
    (It ignores SIGINT and SIGTERM by itself.) Call before anything creates shared memory; the trainer's own
    dispositions are restored on return.
    """
    from multiprocessing import resource_tracker

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignored}
    try:
        resource_tracker.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class PreemptionHandler:
    def __init__(self) -> None:
        self._requested = False
        self._agreed = False
        self._signum: Optional[int] = None
        self._previous: Dict[int, _Handler] = {}
        self._pid = os.getpid()
        self._first_sigint: Optional[float] = None

    def install(self, signals: Sequence[int] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
                ) -> "PreemptionHandler":
        """Route `signals` to the flag. Call from the main thread (Python only allows handlers there)."""
        self._pid = os.getpid()
        for sig in signals:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != self._pid:
            return  # a forked data loader worker: the trainer process handles the signal
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > SIGINT_REPEAT_S:
                self._say("second Ctrl-C: aborting now (the newest complete checkpoint is kept for resume)")
                os._exit(ABORT_EXIT_CODE)
            if self._first_sigint is None:
                self._first_sigint = now
        if self._requested:
            return  # already stopping; e.g. a second USR1 during the final save changes nothing
        self._requested = True
        self._signum = signum
        hint = "; press Ctrl-C again to abort without saving" if signum == signal.SIGINT else ""
        self._say(f"received {signal.Signals(signum).name}: will save and stop at the next step boundary{hint}")

    @staticmethod
    def _say(text: str) -> None:
        try:
            os.write(sys.stderr.fileno(), f"[rank {get_rank()}] {text}\n".encode())
        except (OSError, ValueError):  # stderr closed or replaced by an object without a descriptor
            pass

    @property
    def requested(self) -> bool:
        """This rank received a signal (no communication)."""
        return self._requested

    @property
    def signal_name(self) -> Optional[str]:
        """Name of the first signal received here, e.g. 'SIGUSR1'; None if none was."""
        return signal.Signals(self._signum).name if self._signum is not None else None

    def request_stop(self) -> None:
        """Set the flag from code (tests, or a trainer that wants to stop for its own reason)."""
        self._requested = True

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank has been signalled. All ranks must call it.

        Once True it stays True without further communication, because the ranks then leave the
        loop together and may not call it the same number of times again.
        """
        if not self._agreed:
            self._agreed = all_reduce_max_bool(self._requested)
        return self._agreed
