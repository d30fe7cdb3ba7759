"""slurm/launch.sh's per-node mode: the rendezvous store is hosted by its own process for the whole step, and
the torchrun agents of both "nodes" join it as clients (--rdzv_conf is_host=0), so none of them takes the
store away while the others still close the rendezvous."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from tests.conftest import REPO, clean_env, free_port

WORKER = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(x)
open(f"{sys.argv[1]}/rank{dist.get_rank()}.txt", "w").write(f"{dist.get_world_size()} {x.item()}")
dist.destroy_process_group()
"""
BAD = ("Traceback", "Error waiting on exit barrier", "failed to shutdown", "RendezvousConnectionError")


def _start_store(port: int, ready: Path) -> subprocess.Popen:
    store = subprocess.Popen([sys.executable, "-m", "blip_train.distributed.rendezvous_store", str(port), str(ready)],
                             env=clean_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert store.poll() is None, store.stderr.read()
        assert time.monotonic() < deadline, "the store never became ready"
        time.sleep(0.05)
    return store


@pytest.mark.dist
def test_agents_rendezvous_through_the_hosted_store_which_outlives_them_and_slurm_signals(tmp_path: Path) -> None:
    port = free_port()
    store = _start_store(port, tmp_path / "ready")
    try:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # what Slurm relays to a job
            store.send_signal(sig)
        client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        client.set("before", "agents")
        (tmp_path / "worker.py").write_text(WORKER)
        torchrun = Path(sys.executable).with_name("torchrun")
        agents = [subprocess.Popen([str(torchrun), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                                    "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "job7",
                                    "--rdzv_conf", "is_host=0", str(tmp_path / "worker.py"), str(tmp_path)],
                                   env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True) for _ in range(2)]
        logs = [a.communicate(timeout=300)[0] for a in agents]
        for agent, log in zip(agents, logs):
            assert agent.returncode == 0, log[-3000:]
            for bad in BAD:
                assert bad not in log, log[-3000:]
        assert sorted((tmp_path / f"rank{r}.txt").read_text() for r in range(2)) == ["2 3.0", "2 3.0"]
        # Both agents are gone; the store they used is still there, with what was set before they came.
        assert store.poll() is None
        assert client.get("before") == b"agents"
    finally:
        store.kill()
        store.wait()


def test_a_taken_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    port = free_port()
    holder = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    proc = subprocess.run([sys.executable, "-m", "blip_train.distributed.rendezvous_store", str(port),
                           str(tmp_path / "ready")], env=clean_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    del holder
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rendezvous_store: cannot host the store on port {port}: "), \
        proc.stderr
    assert not (tmp_path / "ready").exists()
