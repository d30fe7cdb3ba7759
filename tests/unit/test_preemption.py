"""PreemptionHandler: a signal sets a flag, never raises, and all ranks agree on stopping."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from blip_train.distributed import PreemptionHandler
from tests.conftest import torchrun

SCRIPT = Path(__file__).resolve().parent.parent / "distributed" / "_preemption_script.py"


def _send_and_wait(handler: PreemptionHandler, sig: int) -> None:
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + 5
    while not handler.requested and time.monotonic() < deadline:
        time.sleep(0.001)


def test_signal_sets_flag_and_second_signal_is_harmless(capfd: pytest.CaptureFixture) -> None:
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: calls.append(a))
    term_before = signal.getsignal(signal.SIGTERM)
    try:
        handler = PreemptionHandler().install()
        assert not handler.should_stop() and handler.signal_name is None
        _send_and_wait(handler, signal.SIGUSR1)
        assert handler.requested and handler.signal_name == "SIGUSR1"
        assert handler.should_stop()
        # A second signal (say during the final checkpoint write) neither raises nor changes anything.
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert handler.should_stop() and handler.signal_name == "SIGUSR1"
        assert capfd.readouterr().err.count("received SIGUSR1") == 1  # logged once
        handler.uninstall()
        assert signal.getsignal(signal.SIGTERM) == term_before
        os.kill(os.getpid(), signal.SIGUSR1)  # back to the handler in place before install
        time.sleep(0.05)
        assert len(calls) == 1
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_ctrl_c_requests_a_save_and_a_repeat_of_the_same_keypress_is_ignored(capfd) -> None:
    with PreemptionHandler() as handler:
        _send_and_wait(handler, signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C forwarded again (torchrun does this)
        time.sleep(0.05)
        assert handler.should_stop() and handler.signal_name == "SIGINT"
    err = capfd.readouterr().err
    assert err.count("received SIGINT") == 1 and "press Ctrl-C again to abort" in err


def test_second_ctrl_c_aborts_at_once(tmp_path) -> None:
    script = tmp_path / "interrupt.py"
    script.write_text(
        "import os, signal, time\n"
        "from blip_train.distributed import PreemptionHandler\n"
        "from blip_train.distributed.preemption import SIGINT_REPEAT_S\n"
        "h = PreemptionHandler().install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(SIGINT_REPEAT_S + 0.3)\n"
        "assert h.requested\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('still running')\n")
    import subprocess
    import sys

    from tests.conftest import REPO, clean_env
    r = subprocess.run([sys.executable, str(script)], env=clean_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 130 and "still running" not in r.stdout
    assert "second Ctrl-C: aborting now" in r.stderr and "Traceback" not in r.stderr


def test_forked_workers_leave_signals_to_the_trainer() -> None:
    """A data loader worker forked after install inherits the handler: it neither dies nor stops the run."""
    with PreemptionHandler() as handler:
        pid = os.fork()
        if pid == 0:  # the child: a Ctrl-C for the whole process group reaches it too
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os._exit(3 if handler.requested else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not handler.requested


def test_the_resource_tracker_outlives_a_relayed_usr1(tmp_path) -> None:
    """SLURM relays USR1 to every process of the step: the tracker that unlinks streaming's shared memory must
    not die of it (it would leak the segments; a relaunched one prints KeyError tracebacks). In a fresh process,
    so that `start_resource_tracker` is what starts it, as in the trainer."""
    import subprocess
    import sys

    from tests.conftest import REPO, clean_env
    script = tmp_path / "tracker.py"
    script.write_text(
        "import os, signal, time\n"
        "from multiprocessing import resource_tracker, shared_memory\n"
        "from blip_train.distributed.preemption import PreemptionHandler, start_resource_tracker\n"
        "start_resource_tracker()\n"
        "assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL\n"  # the caller's disposition is back
        "h = PreemptionHandler().install()\n"
        "shm = shared_memory.SharedMemory(create=True, size=64)\n"
        "pid = resource_tracker._resource_tracker._pid\n"
        "os.kill(pid, signal.SIGUSR1)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(0.5)\n"
        "assert h.requested\n"
        "os.kill(pid, 0)\n"  # still alive
        "shm.close(); shm.unlink()\n"
        "print('tracker alive', resource_tracker._resource_tracker._pid == pid)\n")
    r = subprocess.run([sys.executable, str(script)], env=clean_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "tracker alive True" in r.stdout, r.stdout + r.stderr
    assert "resource_tracker" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_context_manager_restores_handlers() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGUSR1) == handler._on_signal
        handler.request_stop()
        assert handler.should_stop()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.dist
def test_only_rank1_signalled_both_ranks_stop(tmp_path: Path) -> None:
    proc = torchrun([str(SCRIPT), str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["before"] for r in ranks] == [False, False]
    assert [r["after"] for r in ranks] == [True, True] and [r["again"] for r in ranks] == [True, True]
    assert [r["requested"] for r in ranks] == [False, True]
    assert [r["signal"] for r in ranks] == [None, "SIGUSR1"]
