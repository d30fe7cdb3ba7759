"""The `cluster` tier: real services on this host. A two-node Slurm cluster (`local_slurm.py`) runs the
unchanged `slurm/*.sbatch`. The fixture starts it once per session and always stops it; when the host cannot
run it (not root, no package source, no mount namespaces) its tests are skipped with the reason in one line."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.cluster.local_slurm import ClusterUnavailable, LocalSlurmCluster
from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import read_losses, run_train, trainable_weights, write_tiny_config

STEPS = 24
SCHEDULE = {"max_steps": STEPS, "save_interval": 4, "keep_last": 10, "log_interval": 1}
# One data worker per rank: the forked workers must outlive the USR1 that Slurm relays to the whole step.
# A short collective timeout: a dead rank must end the job in about a minute, not hang it for 30.
CLUSTER_SECTIONS = {"train": SCHEDULE, "data": {"num_workers": 1}, "deepspeed": {"timeout_minutes": 1}}
CPU_OPTIONS = ("--gpus-per-node=0", "--nodes=2", "--ntasks-per-node=1")
"""The only sbatch options that differ from the scripts: no GPUs here, one rank per node."""


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node cluster (bt-node0, bt-node1), torn down by PID at the end of the session."""
    if not sys.platform.startswith("linux"):
        pytest.skip("cluster tier skipped: the local Slurm cluster needs Linux")
    root = Path(tempfile.mkdtemp(prefix="bt-slurm-"))  # short: slurmstepd's socket path lives under it
    cluster = LocalSlurmCluster(root)
    try:
        cluster.start()
    except ClusterUnavailable as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"cluster tier skipped: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def cluster_config(assets: Path, run: Path, **sections) -> Path:
    """The tiny stage-1 experiment with the cluster tier's schedule; `sections` update it per section."""
    merged = {k: dict(v) for k, v in CLUSTER_SECTIONS.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return write_tiny_config(assets, run, **merged)


@pytest.fixture(scope="session")
def reference_run(tiny_assets, tmp_path_factory) -> Path:
    """The uninterrupted run of `cluster_config` on 1 node x 2 ranks (torchrun): what every cluster job,
    on 2 nodes x 1 rank, whatever its launcher and interruptions, must end with, bit for bit."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_train(cluster_config(tiny_assets, run))
    return run


def assert_same_run(run: Path, reference: Path) -> None:
    """The same logged losses at every logged step and the same final trainable weights, bit for bit."""
    a, b = read_losses(reference), read_losses(run)  # later lines win: a resumed run's values
    assert b == a, f"losses differ from the uninterrupted run: {b} != {a}"
    tag = f"step_{STEPS:07d}"
    wa, wb = trainable_weights(reference, tag), trainable_weights(run, tag)
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


class SbatchJobs:
    """Submits the repository's sbatch scripts to the local cluster as a user would, from a submit directory
    of their own: it holds `slurm` (a link to the repository's, unchanged) and the `logs/` they write to."""

    def __init__(self, cluster: LocalSlurmCluster, submit_dir: Path) -> None:
        self.cluster = cluster
        self.dir = submit_dir
        (submit_dir / "logs").mkdir(parents=True, exist_ok=True)
        (submit_dir / "slurm").symlink_to(REPO / "slurm")

    def submit(self, config: Path, mode: str = "srun", script: str = "stage1.sbatch", options: tuple = ()) -> int:
        """sbatch the script with CPU_OPTIONS + `options`; the environment differs only by documented variables."""
        venv_bin = Path(sys.executable).parent
        env = clean_env(CONFIG=str(config), MODE=mode, GPUS_PER_NODE="1", PYTHON=sys.executable,
                        TORCHRUN=str(venv_bin / "torchrun"), DEEPSPEED=str(venv_bin / "deepspeed"))
        return self.cluster.sbatch(f"slurm/{script}", options=CPU_OPTIONS + tuple(options), env=env, cwd=self.dir)

    def log(self, job: int) -> str:
        (path,) = (self.dir / "logs").glob(f"*-{job}.out")
        return path.read_text(errors="replace")

    def wait_finished(self, job: int, timeout: float = 300, restarts: int = 0) -> dict:
        """Wait until the job has ended after at least `restarts` requeues; returns `scontrol show job`."""
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
        try:
            return self.cluster.wait_job(job, lambda i: i["JobState"] in ended and int(i["Restarts"]) >= restarts,
                                         timeout, what=f"the end (after {restarts} requeue(s))")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- job log\n{self._log_or_none(job)[-4000:]}") from None

    def wait_for_file(self, job: int, path: Path, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            state = self.cluster.job(job)["JobState"]
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), \
                f"job {job} is {state} before {path} appeared:\n{self._log_or_none(job)[-4000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {path}:\n{self._log_or_none(job)[-4000:]}"
            time.sleep(0.1)

    def wait_for_log(self, job: int, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self._log_or_none(job):
            assert time.monotonic() < deadline, f"job {job}: no {text!r} in its log after {timeout:.0f} s:\n" \
                                                f"{self._log_or_none(job)[-4000:]}"
            time.sleep(0.1)

    def _log_or_none(self, job: int) -> str:
        try:
            return self.log(job)
        except ValueError:
            return "(no log yet)"

    def trainers(self, job: int) -> dict[str, psutil.Process]:
        """The job's training processes by node: `python [flags] -m blip_train.train` (not a launcher that
        passes that module on), without their data loader workers (forked: the same command as their parent)."""
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "-m" not in cmd or cmd[cmd.index("-m") + 1:][:1] != ["blip_train.train"] or \
                    not all(a.startswith("-") for a in cmd[1:cmd.index("-m")]):
                continue
            try:
                env = p.environ()
                if env.get("SLURM_JOB_ID") == str(job) and p.parent().cmdline() != cmd:
                    found[env["SLURMD_NODENAME"]] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found


@pytest.fixture
def jobs(slurm_cluster, tmp_path) -> SbatchJobs:
    return SbatchJobs(slurm_cluster, tmp_path / "submit")


def attempts(log: str) -> list[str]:
    """The log of each attempt of a requeued job (sbatch --open-mode=append), split at launch.sh's banner."""
    parts = log.split("launch.sh: MODE=")
    return ["launch.sh: MODE=" + p for p in parts[1:]]


def shm_of(cluster: LocalSlurmCluster, node: str) -> list[str]:
    """What is in a node's own /dev/shm (seen through its slurmd's mount namespace)."""
    return sorted(os.listdir(f"/proc/{cluster.node_pid(node)}/root/dev/shm"))


def pytest_terminal_summary(terminalreporter) -> None:
    """One closing line for the tier: how many of its tests ran on the cluster, or why none could."""
    ran, skipped = {}, {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if not nodeid.startswith("tests/cluster/"):
                continue
            if outcome == "skipped":
                skipped[nodeid] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            elif report.when == "call" or outcome in ("failed", "error"):
                ran.setdefault(nodeid, outcome)
    if ran:
        counts = ", ".join(f"{sum(v == o for v in ran.values())} {o}" for o in ("passed", "failed", "error")
                           if o in ran.values())
        terminalreporter.write_line(f"cluster tier: {len(ran)} tests ran on the local 2-node Slurm cluster ({counts})")
    elif skipped:
        reason = next(iter(skipped.values())).removeprefix("Skipped: ").removeprefix("cluster tier skipped: ")
        terminalreporter.write_line(f"cluster tier: {len(skipped)} tests skipped: {reason}")
