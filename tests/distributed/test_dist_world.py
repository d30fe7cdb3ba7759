"""WorldInfo gathers and dist helpers: one process, and 2 ranks under torchrun (gloo)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_train.distributed.world import build_world_info
from tests.conftest import REPO, clean_env, torchrun
from tests.distributed._world_script import rank_input, rank_loss

SCRIPT = Path(__file__).with_name("_world_script.py")
SLURM_SCRIPT = Path(__file__).with_name("_slurm_env_script.py")


def test_world_info_without_process_group_is_one_rank() -> None:
    info = build_world_info()
    x = torch.ones(2, 3, requires_grad=True)
    assert (info.rank, info.size) == (0, 1)
    assert not info.gather(x).requires_grad
    assert info.gather_with_grad(x) is x


@pytest.mark.dist
def test_two_rank_gathers_match_single_process(tmp_path: Path) -> None:
    proc = torchrun([str(SCRIPT), str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["size"], r["launcher"], r["local_world_size"]) for r in ranks] == \
        [(0, 2, "torchrun", 2), (1, 2, "torchrun", 2)]

    full = torch.cat([rank_input(0), rank_input(1)])  # (2B, D)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["gather"], dtype=torch.float64), full, rtol=0, atol=0)
        torch.testing.assert_close(torch.tensor(r["gather_with_grad"], dtype=torch.float64), full, rtol=0, atol=0)
        assert r["gather_requires_grad"] is False

    # Single process: the sum of both ranks' losses on the concatenated batch. Each rank's slice of
    # that gradient must equal what gather_with_grad delivered to the rank owning the slice.
    ref = full.clone().requires_grad_(True)
    (rank_loss(ref, 0) + rank_loss(ref, 1)).backward()
    got = torch.cat([torch.tensor(r["grad"], dtype=torch.float64) for r in ranks])
    torch.testing.assert_close(got, ref.grad, rtol=1e-12, atol=1e-10)

    for r in ranks:
        assert r["mean"] == [0.5, 10.0]
        assert (r["any_rank1"], r["any_none"]) == (True, False)
        # ZeRO-3: a partitioned Linear(4, 3) holds nothing locally, 12 elements in full.
        assert (r["zero3_param"], r["local_numel"], r["full_numel"]) == (True, 0, 12)
        assert r["gathered_shape"] == [3, 4]
        assert r["after_modify"] == [1.5]
        assert r["plain"] == [False, 12]


def _job_id_with_free_port() -> int:
    """A fake SLURM job id whose derived MASTER_PORT (10000 + id % 20000) is free right now."""
    for offset in range(0, 20000, 7):
        port = 10000 + (os.getpid() * 31 + offset) % 20000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4_000_000 + port - 10000  # job ids are large; % 20000 still gives `port - 10000`
    raise RuntimeError("no free port in 10000..29999")


@pytest.mark.dist
def test_slurm_variables_form_a_working_process_group(tmp_path: Path) -> None:
    job_id = _job_id_with_free_port()
    slurm = {"SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost,node[2-3]"}
    procs = [subprocess.Popen([sys.executable, str(SLURM_SCRIPT), str(tmp_path)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=clean_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
             for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["env"] == {"rank": r, "local_rank": r, "world_size": 2, "local_world_size": 2, "node_rank": 0,
                              "master_addr": "localhost", "master_port": 10000 + job_id % 20000,
                              "launcher": "slurm"}
        assert (got["backend"], got["dist_rank"], got["dist_world"], got["sum"]) == ("gloo", r, 2, 3.0)
        assert got["exported"]["LOCAL_WORLD_SIZE"] == "2" and got["exported"]["MASTER_ADDR"] == "localhost"
