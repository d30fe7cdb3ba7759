"""The unchanged slurm/*.sbatch on a real two-node Slurm cluster, 2 nodes x 1 rank: every launcher mode,
preemption by `scancel --signal=USR1 --batch` (in every mode: the torchrun and deepspeed launchers must
survive the USR1 that Slurm relays to the whole step) and by the time-limit warning (`--signal=B:USR1@N`),
a rank killed mid-run. Every job that finishes must end with exactly the weights of the uninterrupted
reference run on 1 node x 2 ranks (torchrun): launcher, node layout, requeues and restarts change nothing.

The preempted jobs run side by side, each driven by a thread, so the tier costs about its CPU work rather
than the sum of its waits (Slurm's ~30 s limit checks, the ~11 s hold before a requeued job restarts)."""
from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cluster.conftest import STEPS, SbatchJobs, assert_same_run, attempts, cluster_config, shm_of

pytestmark = pytest.mark.cluster
MODES = ("srun", "per-node", "deepspeed")
LAUNCHER = {"srun": "slurm", "per-node": "torchrun", "deepspeed": "deepspeed"}
"""What blip_train/distributed/env.py reads the ranks from in each launch.sh mode."""
TIME_LIMIT = ("--time=3", "--signal=B:USR1@90")
"""Slurm checks limits every ~30 s and sends the warning at the first check within N + 30 s of the limit:
60-90 s into each attempt, after the trainers have installed their handler, and late enough that the
requeued attempt is done before its own warning."""


def _assert_clean(log: str) -> None:
    """Nothing died on the way: no traceback, the resource tracker survived every relayed signal."""
    for bad in ("Traceback", "resource_tracker", "died unexpectedly", "leak", "Killed"):
        at = log.find(bad)
        assert at < 0, f"{bad!r} in the job log:\n{log[max(0, at - 2000):at + 2000]}"


def _scancel_flow(jobs: SbatchJobs, config, run, mode: str, submitted: list) -> int:
    """Submit; once the first checkpoint is written, `scancel --signal=USR1 --batch` (what a preempting
    scheduler or a user does); return the job id once it has ended after a requeue."""
    job = jobs.submit(config, mode=mode)
    submitted.append(job)
    jobs.wait_for_file(job, run / "checkpoints" / "latest")
    jobs.cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    jobs.wait_finished(job, restarts=1, timeout=400)
    return job


def _time_limit_flow(jobs: SbatchJobs, config, run, submitted: list) -> int:
    """Submit with a short time limit; freeze the ranks after the first checkpoint, as in a long step (the
    tiny run would otherwise be done before the warning); thaw them once Slurm's USR1 has reached launch.sh,
    which forwarded it to them (it waits, pending). Returns the job id once it has ended after a requeue."""
    job = jobs.submit(config, options=TIME_LIMIT)
    submitted.append(job)
    jobs.wait_for_file(job, run / "checkpoints" / "latest")
    ranks = jobs.trainers(job)
    assert sorted(ranks) == ["bt-node0", "bt-node1"], ranks
    for p in ranks.values():
        p.send_signal(signal.SIGSTOP)
    try:
        jobs.wait_for_log(job, "launch.sh: caught SIGUSR1", timeout=150)
    finally:
        for p in ranks.values():
            p.send_signal(signal.SIGCONT)
    jobs.wait_finished(job, restarts=1, timeout=400)
    return job


@pytest.fixture(scope="module")
def preempted(slurm_cluster, tiny_assets, tmp_path_factory):
    """The preemption scenarios, started together: {name: (SbatchJobs, Future of the job id, run dir)} for
    each launcher mode (scancel) and for "time-limit"."""
    root, out, submitted = tmp_path_factory.mktemp("preempted"), {}, []
    pool = ThreadPoolExecutor(len(MODES) + 1)
    for name in (*MODES, "time-limit"):
        jobs, run = SbatchJobs(slurm_cluster, root / name / "submit"), root / name / "run"
        config = cluster_config(tiny_assets, run)
        future = pool.submit(_time_limit_flow, jobs, config, run, submitted) if name == "time-limit" else \
            pool.submit(_scancel_flow, jobs, config, run, name, submitted)
        out[name] = (jobs, future, run)
    yield out
    for job in submitted:  # still there if a test was not selected or failed early
        slurm_cluster.run(["scancel", str(job)], check=False)
    pool.shutdown(wait=True, cancel_futures=True)


def _assert_requeued_and_resumed(jobs: SbatchJobs, job: int, run, reference_run) -> str:
    """The first attempt saved and exited 0 because of USR1, launch.sh requeued the job, the second attempt
    (SLURM_RESTART_COUNT=1) resumed from exactly that checkpoint and finished with the reference's weights.
    Returns the job's log."""
    info = jobs.cluster.job(job)
    log = jobs.log(job)
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "bt-node[0-1]"), log[-4000:]
    first, second = attempts(log)[:2]
    assert "RESTART=0" in first and "RESTART=1" in second
    assert "launch.sh: caught SIGUSR1" in first
    stopped = re.search(r"stop requested \(SIGUSR1\): checkpoint saved at step (\d+)", first)
    assert stopped, first[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < STEPS
    assert f"launch.sh: job step exited with status 0 after SIGUSR1; requeueing job {job}" in first
    assert f"resumed from {run / 'checkpoints' / f'step_{step:07d}'} at step {step}" in second, second[-3000:]
    assert f"done: step {STEPS}, checkpoint" in attempts(log)[-1]
    _assert_clean(log)
    assert_same_run(run, reference_run)
    return log


@pytest.mark.parametrize("mode", MODES)
def test_every_launch_mode_trains_on_both_nodes_and_resumes_exactly_after_scancel_usr1(preempted, reference_run,
                                                                                       mode):
    jobs, future, run = preempted[mode]
    log = _assert_requeued_and_resumed(jobs, future.result(timeout=900), run, reference_run)
    for attempt in attempts(log)[:2]:
        # One rank per node. torchrun's c10d rendezvous numbers the nodes in the order they join.
        placed = re.search(rf"world: 2 ranks on 2 nodes \({LAUNCHER[mode]}\): (bt-node\d) \[0\], (bt-node\d) \[1\]",
                           attempt)
        assert placed and {placed.group(1), placed.group(2)} == {"bt-node0", "bt-node1"}, attempt[-3000:]
        if mode != "per-node":
            assert placed.groups() == ("bt-node0", "bt-node1")  # node rank = SLURM_NODEID


def test_time_limit_warning_checkpoints_requeues_and_the_requeued_job_resumes_exactly(preempted, reference_run):
    """`--time=3 --signal=B:USR1@90`: Slurm itself sends USR1 to the batch shell as the limit nears (see
    `_time_limit_flow`)."""
    jobs, future, run = preempted["time-limit"]
    _assert_requeued_and_resumed(jobs, future.result(timeout=900), run, reference_run)


def test_a_killed_rank_ends_the_job_with_an_error_and_resubmission_resumes(jobs, tiny_assets, tmp_path,
                                                                           reference_run):
    """SIGKILL one rank (no chance to clean up): the job fails within the collective timeout
    (deepspeed.timeout_minutes=1) instead of hanging, says which task died, is not requeued; submitting it
    again resumes from the last checkpoint."""
    run = tmp_path / "run"
    config = cluster_config(tiny_assets, run)
    job = jobs.submit(config)
    jobs.wait_for_file(job, run / "checkpoints" / "latest")
    ranks = jobs.trainers(job)
    ranks["bt-node1"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    info = jobs.wait_finished(job, timeout=120)
    took = time.monotonic() - killed
    log = jobs.log(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-4000:]
    assert took < 60, f"the job took {took:.0f} s to end after a rank died"
    assert "bt-node1: task 1: Killed" in log, log[-4000:]
    assert "requeueing" not in log
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))

    again = jobs.submit(config)
    info = jobs.wait_finished(again)
    log = jobs.log(again)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert f"resumed from {run / 'checkpoints' / saved[-1]}" in log
    assert_same_run(run, reference_run)


def test_no_job_left_shared_memory_on_either_node(slurm_cluster, preempted):
    """Once every job has ended, neither node's /dev/shm holds a streaming segment: each job's datasets
    unlinked theirs, through requeues and a killed rank (a resource tracker killed by a relayed USR1 would
    leave its run's segments behind)."""
    deadline = time.monotonic() + 300
    while slurm_cluster.run(["squeue", "-h"]).stdout.strip():
        assert time.monotonic() < deadline, slurm_cluster.run(["squeue"]).stdout
        time.sleep(1)
    for node in ("bt-node0", "bt-node1"):
        left = [n for n in shm_of(slurm_cluster, node) if re.match(r"^\d{6}_", n)]
        assert left == [], f"{node}: {left}"
