"""Two ranks read disjoint samples, resume exactly mid-epoch, and a 2-rank state resumes on 1 rank; two jobs
on one machine do not disturb each other's shared memory."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, clean_env, free_port, torchrun

from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.datasets import build_train_loader
from blip_train.data.schema import write_split
from blip_train.data.synthetic import make_sample

pytestmark = pytest.mark.dist
N = 40


def test_two_ranks_disjoint_and_resume(tmp_path):
    split = tmp_path / "train"
    write_split(split, (make_sample(i, seed=0, image_size=16) for i in range(N)))
    r = torchrun(["tests/distributed/_data_rank_script.py", "--data", str(split), "--out", str(tmp_path)], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]

    # Disjoint, and together exactly one epoch.
    a, b = (set(x["full"]) for x in ranks)
    assert not a & b and a | b == set(range(N)) and len(ranks[0]["full"]) == len(ranks[1]["full"]) == N // 2
    assert ranks[0]["local_world_size"] == "2"
    # Mid-epoch resume on the same world size gives the uninterrupted order on every rank.
    for x in ranks:
        assert x["part"] + x["rest"] == x["full"]
    assert ranks[0]["state"] == ranks[1]["state"]

    # Elastic 2 → 1: the saved state resumes on one rank with exactly the samples not yet seen.
    loader = build_train_loader(DataConfig(train=[StreamConfig(local=str(split))], image_size=16,
                                           num_workers=0), 4)
    loader.load_state_dict(ranks[0]["state"])
    rest = [i for batch in loader for i in batch["image_id"].tolist()]
    seen = ranks[0]["part"] + ranks[1]["part"]
    assert sorted(seen + rest) == list(range(N))


def test_two_jobs_on_one_machine_each_read_their_own_split(tmp_path):
    """Job A resumes mid-epoch (its position waits in shared memory for its readers); job B starts on the
    same machine before A reads on. B's shared-memory clean-up must leave A's live segments alone
    (streaming's own cleaner unlinks every one: A's readers then find no position and restart the epoch,
    and B, not seeing A's file locks in its own TMPDIR as under a per-job /tmp, takes over A's names).
    Each job reads every sample of its own split exactly once; splits differ in size and ids."""
    sizes, first = {"a": 40, "b": 56}, {"a": 0, "b": 1000}
    for job, n in sizes.items():
        write_split(tmp_path / job / "train", (make_sample(first[job] + i, seed=0, image_size=16) for i in range(n)))
        (tmp_path / job / "tmp").mkdir()
    ready = {job: tmp_path / f"{job}.ready" for job in sizes}
    extra = {"a": ["--resume-after", "2", "--read-after", str(ready["b"])], "b": ["--build-after", str(ready["a"])]}
    procs = {}
    for job in sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "tests/distributed/_shm_neighbour_script.py", "--data", str(tmp_path / job / "train"),
               "--out", str(tmp_path / job), "--ready", str(ready[job]), *extra[job]]
        procs[job] = subprocess.Popen(cmd, cwd=REPO, env=clean_env(TMPDIR=str(tmp_path / job / "tmp")),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        outs = {job: proc.communicate(timeout=300)[0] for job, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for job, n in sizes.items():
        assert procs[job].returncode == 0, f"job {job}:\n" + outs[job][-3000:]
        ranks = [json.loads((tmp_path / job / f"rank{r}.json").read_text()) for r in range(2)]
        assert sorted(ranks[0] + ranks[1]) == list(range(first[job], first[job] + n)), (job, ranks)


def test_training_under_a_cache_limit_and_the_job_cache_clean_up(tiny_assets, tmp_path):
    """Two ranks train over more than an epoch of a remote split larger than data.cache_limit: the cache stays
    under the limit (evicted shards are fetched again). The job's cache is kept with data.keep_cache=true and
    removed at the end of training otherwise."""
    from tests.helpers.tiny_run import read_losses, run_train, write_tiny_config

    remote = tmp_path / "remote"
    write_split(remote, (make_sample(i, seed=0, image_size=32) for i in range(300)), size_limit=4000)
    shards = json.loads((remote / "index.json").read_text())["shards"]
    largest = max(s["raw_data"]["bytes"] for s in shards)
    in_flight = 2 * 8 * 4  # ranks x streaming's predownload (8 x micro batch), each sample maybe in its own shard
    limit = (remote / "index.json").stat().st_size + (in_flight + 8) * largest
    assert limit < 0.8 * sum(s["raw_data"]["bytes"] for s in shards)
    data = {"train": [{"remote": str(remote), "name": "syn"}], "cache_dir": str(tmp_path / "cache"),
            "cache_limit": str(limit)}
    kept = tmp_path / "kept"
    run_train(write_tiny_config(tiny_assets, kept, data=dict(data, keep_cache=True),
                                train={"max_steps": 45, "save_interval": 45, "log_interval": 5}))  # 1.2 epochs
    assert sorted(read_losses(kept))[-1] == 45
    (job,) = (tmp_path / "cache").iterdir()
    cached = [p.stat().st_size for p in (job / "syn").iterdir() if p.name.endswith(".mds")]
    assert 0 < len(cached) < len(shards) and sum(cached) <= limit

    removed = tmp_path / "removed"
    r = run_train(write_tiny_config(tiny_assets, removed, data=data, train={"max_steps": 2, "save_interval": 2}))
    assert "removed the job's remote-stream cache" in r.stdout
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [job.name]  # this run's own folder is gone


def test_jobs_that_start_together_on_one_machine_each_register_their_own_shared_memory(tmp_path):
    """Three 2-rank jobs build six loaders each at the same moment on one machine. Streaming picks a dataset's
    shared-memory names by scanning /dev/shm for the first free prefix, so two jobs scanning together chose
    the same one and a rank died with FileExistsError ('/002648_locals', seen when a Slurm cluster started
    requeued jobs together); under the node's registration lock (data/shared_memory.py) every job builds
    all of its loaders."""
    jobs, rounds = ("a", "b", "c"), 6
    for job in jobs:
        write_split(tmp_path / job / "train", (make_sample(i, seed=0, image_size=16) for i in range(8)))
    go = tmp_path / "go"
    procs = {job: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "tests/distributed/_shm_race_script.py", "--data", str(tmp_path / job / "train"), "--rounds", str(rounds),
         "--go", str(go)], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for job in jobs}
    try:
        time.sleep(8)  # every rank has joined its process group and waits for the go
        go.write_text("go")
        outs = {job: proc.communicate(timeout=300)[0] for job, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for job, proc in procs.items():
        assert proc.returncode == 0 and f"built {rounds} loaders" in outs[job], f"job {job}:\n" + outs[job][-3000:]
