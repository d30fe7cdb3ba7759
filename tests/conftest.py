"""Shared fixtures: one in-process rank for DeepSpeed, offline HF, helpers for 2-rank subprocesses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blip_train.data.shared_memory import releasing_streaming_memory
from blip_train.distributed.env import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(scope="session", autouse=True)
def single_rank_env():
    """One in-process rank: DeepSpeed otherwise falls back to MPI discovery."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    yield


@pytest.fixture(autouse=True)
def release_streaming_memory():
    """Each test closes the streaming datasets it opened in this process: streaming keeps every one (a dozen
    descriptors) until the process exits, and the whole suite in one process would run out of descriptors."""
    with releasing_streaming_memory():
        yield


def clean_env(**extra: str) -> dict:
    """Environment for a child launcher: no inherited rank variables, offline, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600, env: dict | None = None,
             cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --nproc_per_node N args...` and return the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Root of the tiny stage-1 experiment assets (data, tokenizer, ViT weights), built once per session."""
    from tests.helpers.tiny_run import make_tiny_assets
    root = tmp_path_factory.mktemp("tiny_assets")
    make_tiny_assets(root)
    return root


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it at once (no chance to clean up: the worst case), and wait
    for them. torchrun's workers may live in their own process groups, so each is killed explicitly."""
    import psutil

    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
