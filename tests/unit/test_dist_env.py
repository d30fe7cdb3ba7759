"""Rank discovery under each launcher, SLURM parsing, and the dist helpers without a process group."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from blip_train.distributed import (DistEnvError, all_reduce_max_bool, all_reduce_mean, barrier, discover_environment,
                             export_environment, full_numel, gathered, is_main_process, is_zero3_param,
                             maybe_zero_init, print0)
from blip_train.distributed.env import DistEnv, expand_nodelist, parse_tasks_per_node, slurm_master_port

TORCHRUN = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "host0", "MASTER_PORT": "29500"}
SLURM = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16",
         "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "8(x2)",
         "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_nothing_set_is_single_process() -> None:
    env = discover_environment({})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (0, 0, 1, 1, 0)
    assert env.launcher == "single" and env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536


def test_torchrun_variables() -> None:
    env = discover_environment(TORCHRUN)
    assert env == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1,
                          master_addr="host0", master_port=29500, launcher="torchrun")


def test_torchrun_under_srun_wins_over_slurm() -> None:
    # One torchrun per node: SLURM describes 2 tasks (the torchruns), RANK/WORLD_SIZE the 16 workers.
    env = discover_environment({**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_TASKS_PER_NODE": "1(x2)",
                                **TORCHRUN, "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "13"})
    assert (env.launcher, env.rank, env.world_size, env.local_world_size, env.master_addr) == \
        ("torchrun", 13, 16, 8, "host0")


def test_deepspeed_launcher_derives_local_world_size() -> None:
    base = {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
            "CROSS_RANK": "1", "CROSS_SIZE": "2"}
    env = discover_environment({**base, "LOCAL_SIZE": "8"})
    assert (env.launcher, env.local_world_size, env.node_rank, env.local_rank) == ("deepspeed", 8, 1, 1)
    assert discover_environment(base).local_world_size == 8  # WORLD_SIZE // CROSS_SIZE
    with pytest.raises(DistEnvError, match="CROSS_SIZE"):
        discover_environment({**base, "CROSS_SIZE": "3"})


def test_slurm_one_task_per_gpu() -> None:
    env = discover_environment(SLURM)
    assert env == DistEnv(rank=11, local_rank=3, world_size=16, local_world_size=8, node_rank=1,
                          master_addr="gpu07", master_port=10000 + 123456 % 20000, launcher="slurm")
    assert env.num_nodes == 2


def test_slurm_master_overrides_and_uneven_nodes() -> None:
    env = discover_environment({**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242"})
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 4242)
    # 5 tasks on 2 nodes: the step's per-node list wins over the job's.
    env = discover_environment({**SLURM, "SLURM_NTASKS": "5", "SLURM_PROCID": "4", "SLURM_LOCALID": "0",
                                "SLURM_STEP_TASKS_PER_NODE": "4,1"})
    assert (env.local_world_size, env.node_rank) == (1, 1)
    only_ntasks = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    assert discover_environment({**only_ntasks, "SLURM_NTASKS_PER_NODE": "8"}).local_world_size == 8
    assert discover_environment(only_ntasks).local_world_size == 8  # NTASKS // NNODES


def test_slurm_rank_variables_must_agree() -> None:
    assert discover_environment({**SLURM, "WORLD_SIZE": "16", "RANK": "11"}).launcher == "slurm"
    with pytest.raises(DistEnvError, match="WORLD_SIZE=8 disagrees with SLURM_NTASKS=16") as err:
        discover_environment({**SLURM, "WORLD_SIZE": "8"})
    assert "\n" not in str(err.value)
    with pytest.raises(DistEnvError, match="RANK=0 disagrees with SLURM_PROCID=11"):
        discover_environment({**SLURM, "RANK": "0"})


@pytest.mark.parametrize("environ, message", [
    ({**TORCHRUN, "RANK": "8"}, "rank 8 is outside world size 8"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, "local rank 4 is outside local world size 4"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR is not set"),
    ({**TORCHRUN, "WORLD_SIZE": "eight"}, "WORLD_SIZE='eight' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "set LOCAL_WORLD_SIZE"),
    ({**SLURM, "SLURM_JOB_NODELIST": "gpu[07-08"}, "unbalanced"),
    ({**SLURM, "SLURM_TASKS_PER_NODE": "8(x)"}, "cannot parse SLURM tasks-per-node"),
    ({**SLURM, "SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside SLURM_TASKS_PER_NODE"),
])
def test_inconsistent_environments_fail_in_one_line(environ: dict, message: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol fallback
    with pytest.raises(DistEnvError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        discover_environment(environ)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node1", ["node1"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a[1],b", ["a1", "b"]),
])
def test_expand_nodelist(nodelist: str, hosts: list) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_tasks_per_node_and_port() -> None:
    assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert parse_tasks_per_node("8") == [8]
    assert slurm_master_port("20001") == 10001 and slurm_master_port("7") == 10007


def test_unknown_nodelist_syntax_falls_back_to_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho firsthost\necho second\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    env = discover_environment({**SLURM, "SLURM_JOB_NODELIST": "weird[a-b]"})
    assert env.master_addr == "firsthost"


def test_export_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    export_environment(discover_environment(SLURM))
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                        "MASTER_PORT")} == \
        {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
         "MASTER_PORT": str(10000 + 123456 % 20000)}
    # What we export reads back as the same world.
    again = discover_environment(os.environ)
    assert (again.rank, again.world_size, again.local_world_size, again.master_addr) == (11, 16, 8, "gpu07")


def test_helpers_on_one_rank(capsys: pytest.CaptureFixture) -> None:
    assert is_main_process()
    print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    barrier()
    assert all_reduce_max_bool(True) and not all_reduce_max_bool(False)
    t = torch.tensor([1, 2])
    mean = all_reduce_mean(t)
    assert mean.dtype == torch.float32 and mean.tolist() == [1.0, 2.0] and mean is not t


def test_zero_helpers_without_partitioning() -> None:
    layer = nn.Linear(4, 3)
    assert not is_zero3_param(layer.weight) and full_numel(layer.weight) == 12
    with gathered(layer, modifier_rank=0), gathered([layer.bias]), gathered(layer.weight):
        assert layer.weight.shape == (3, 4)
    zero2 = {"zero_optimization": {"stage": 2}}
    with maybe_zero_init(False, {"zero_optimization": {"stage": 3}}), maybe_zero_init(True, zero2):
        plain = nn.Linear(2, 2)
    assert not is_zero3_param(plain.weight)


def test_cpu_run_on_a_gpu_host_keeps_deepspeed_on_cpu(tmp_path: Path) -> None:
    """run.device=cpu where CUDA exists: DeepSpeed would pick CUDA and NCCL by itself."""
    import subprocess
    import sys

    from tests.conftest import REPO, clean_env

    script = tmp_path / "probe.py"
    script.write_text(
        "import os, torch\n"
        "torch.cuda.is_available = lambda: True  # a GPU host, as far as the code can tell\n"
        "from blip_train.distributed.env import discover_environment\n"
        "from blip_train.distributed.process_group import init_distributed\n"
        "init_distributed(discover_environment(), 1, on_cuda=False)\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "import torch.distributed as dist\n"
        "print(os.environ['DS_ACCELERATOR'], get_accelerator().device_name(), dist.get_backend())\n")
    r = subprocess.run([sys.executable, str(script)], env=clean_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "cpu cpu gloo"


@pytest.mark.parametrize("local_rank, local_world, count, device", [
    (3, 8, 8, 3),  # every task sees the node's 8 GPUs: its local rank
    (3, 8, 1, 0),  # srun --gpus-per-task=1: each task sees one GPU, always index 0
    (0, 1, 1, 0),
    (1, 2, 4, 1),  # more GPUs than tasks: still the local rank
])
def test_cuda_device_follows_what_the_task_sees(local_rank: int, local_world: int, count: int, device: int) -> None:
    from blip_train.distributed.env import cuda_device_index

    assert cuda_device_index(local_rank, local_world, count) == device


@pytest.mark.parametrize("count, fragment", [
    (2, "4 tasks on this node but this task sees 2 GPUs (CUDA_VISIBLE_DEVICES=2,3): give every task all of the "
        "node's GPUs or exactly one (srun --gpus-per-task=1)"),
    (0, "no CUDA device visible to this task (CUDA_VISIBLE_DEVICES=2,3)"),
])
def test_unmappable_gpu_layouts_refused_in_one_line(count: int, fragment: str) -> None:
    from blip_train.distributed.env import cuda_device_index

    with pytest.raises(DistEnvError) as e:
        cuda_device_index(3, 4, count, visible="2,3")
    assert str(e.value).count("\n") == 0 and fragment in str(e.value)


def test_one_gpu_per_task_exports_local_rank_0_for_deepspeed() -> None:
    """srun --gpus-per-task=1 on an 8-GPU node: task 5 sees one GPU. DeepSpeed calls set_device(LOCAL_RANK),
    so LOCAL_RANK must name that GPU (0); the node-local rank stays in the DistEnv, and streaming's node
    layout (RANK, LOCAL_WORLD_SIZE) is untouched."""
    from blip_train.distributed.env import select_cuda_device

    environ = {**SLURM, "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"}
    env = discover_environment(environ)
    environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                   LOCAL_WORLD_SIZE=str(env.local_world_size))
    assert select_cuda_device(env, device_count=1, environ=environ) == 0
    assert environ["LOCAL_RANK"] == "0" and env.local_rank == 5
    assert (environ["RANK"], environ["LOCAL_WORLD_SIZE"]) == ("13", "8")
    # Every GPU visible to every task: nothing to remap.
    del environ["CUDA_VISIBLE_DEVICES"]
    assert select_cuda_device(env, device_count=8, environ=environ) == 5 and environ["LOCAL_RANK"] == "5"


def test_placement_line_names_each_node_and_its_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process here; on 2 nodes the cluster tier reads e.g. `world: 2 ranks on 2 nodes (slurm): bt-node0 [0],
    bt-node1 [1]`. Under SLURM a node is SLURMD_NODENAME (several nodes may share a host name)."""
    from blip_train.distributed.process_group import _spans, describe_placement

    env = discover_environment({})
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-a")
    assert describe_placement(env) == "world: 1 rank on 1 node (single): gpu-a [0]"
    assert [_spans(r) for r in ([0], [0, 1, 2, 3], [8, 9, 11, 13, 14])] == ["0", "0-3", "8-9,11,13-14"]
