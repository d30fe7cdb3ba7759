"""Remote streams against a real S3 API (moto's server on 127.0.0.1, tests/helpers/local_s3.py): an MDS split
uploaded with boto3 and read by streaming's S3 downloader, on 2 ranks, through the job's cache under a
data.cache_limit smaller than the split; exact resume after SIGKILL; a missing bucket and refused credentials
found before any process group; credentials taken from the environment and never written anywhere."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blip_train.data.schema import write_split
from blip_train.data.synthetic import make_sample
from tests.conftest import REPO, clean_env, free_port, kill_process_tree, torchrun
from tests.helpers.local_s3 import LocalS3, S3Unavailable
from tests.helpers.tiny_run import read_losses, run_train, trainable_weights, write_tiny_config

pytestmark = pytest.mark.dist
SAMPLES = 192
STEPS = 24  # one epoch of 2 ranks x 4: every shard is read once, more than the cache limit holds
SCHEDULE = {"max_steps": STEPS, "save_interval": 4, "keep_last": 10, "log_interval": 1}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    server = LocalS3(root / "moto.log")
    try:
        server.start()
    except S3Unavailable as e:
        pytest.skip(f"S3 tests skipped: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def split(tmp_path_factory, s3) -> dict:
    """One split on local disk (for the reference run) and the same files in s3://blip-train/synthetic.
    One sample per shard: the ranks' read-ahead may touch a shard per sample, so this layout lets a cache
    limit that holds it stay well below the split (the index, ~0.5 kB a shard, counts against it too)."""
    local = tmp_path_factory.mktemp("split") / "synthetic"
    write_split(local, (make_sample(i, seed=0, image_size=32) for i in range(SAMPLES)), size_limit=2000)
    shards = json.loads((local / "index.json").read_text())["shards"]
    return {"local": local, "remote": s3.upload_dir(local, "blip-train", "synthetic"), "shards": shards}


def _cache_limit(split: dict) -> int:
    """Room for what 2 ranks may hold at once (streaming's read-ahead of 8 batches of 4 each, maybe one shard
    a sample, plus the one being read), still well below the split: shards must be evicted and fetched again."""
    shards = split["shards"]
    largest = max(s["raw_data"]["bytes"] for s in shards)
    limit = (split["local"] / "index.json").stat().st_size + (2 * 8 * 4 + 8) * largest
    assert limit < 0.8 * sum(s["raw_data"]["bytes"] for s in shards)
    return limit


def _start(config: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "blip_train.train", "--config", str(config)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_all_after(path: Path, proc: subprocess.Popen, timeout: float = 300) -> str:
    """Once `path` exists, SIGKILL the launcher and both ranks at once (no chance to clean up); their output."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "run ended before the interruption point:\n" + proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)
    kill_process_tree(proc)
    return proc.communicate()[0]


def _assert_no_credentials(s3: LocalS3, *texts: str, folders: tuple[Path, ...] = ()) -> None:
    """Neither the access key id nor the secret appears in any output, log or file the run wrote."""
    secrets = (s3.access_key, s3.secret_key)
    for text in texts:
        assert not any(s in text for s in secrets)
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size < 10_000_000:
                data = path.read_bytes()
                assert not any(s.encode() in data for s in secrets), path


def test_two_ranks_train_from_s3_under_a_cache_limit_and_resume_exactly_after_sigkill(s3, split, tiny_assets,
                                                                                       tmp_path):
    """SIGKILL mid-run, restart: the run ends bit for bit as an uninterrupted one on the same split read from
    local disk. The job's cache (data.keep_cache to look at it) never held more than the limit (plus one
    shard: streaming counts a shard once downloaded, and the reader and its read-ahead may each be fetching
    one), held fewer shards than the split, and lives in a folder of its own per job."""
    reference = tmp_path / "reference"
    run_train(write_tiny_config(tiny_assets, reference, train=SCHEDULE,
                                data={"train": [{"local": str(split["local"]), "name": "synthetic"}]}))

    run, cache, limit = tmp_path / "s3run", tmp_path / "cache", _cache_limit(split)
    config = write_tiny_config(tiny_assets, run, train=SCHEDULE, data={
        "train": [{"remote": split["remote"], "name": "synthetic"}], "cache_dir": str(cache),
        "cache_limit": str(limit), "keep_cache": True})
    env = clean_env(**s3.env())
    killed = _kill_all_after(run / "checkpoints" / "latest", _start(config, env))
    (first_job,) = cache.iterdir()

    r = torchrun(["-m", "blip_train.train", "--config", str(config)], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", r.stdout)
    assert resumed and split["remote"] in r.stdout, r.stdout[-3000:]  # the stream line names where it reads
    a, b = read_losses(reference), read_losses(run)  # later lines win: the resumed run's values
    assert b == a
    tag = f"step_{STEPS:07d}"
    wa, wb = trainable_weights(reference, tag), trainable_weights(run, tag)
    assert wa.keys() == wb.keys() and [k for k in wa if not torch.equal(wa[k], wb[k])] == []

    jobs = sorted(cache.iterdir())
    assert len(jobs) == 2 and first_job in jobs  # one folder per job: the killed one's is left as it was
    (second_job,) = [j for j in jobs if j != first_job]
    shards = [p for p in (second_job / "synthetic").iterdir() if p.name.endswith(".mds")]
    largest = max(s["raw_data"]["bytes"] for s in split["shards"])
    read = (STEPS - int(resumed.group(1))) * 2 * 4  # samples, each in a shard of its own
    assert 0 < len(shards) < read  # shards were evicted
    assert sum(p.stat().st_size for p in shards) <= limit + largest
    _assert_no_credentials(s3, killed, r.stdout, r.stderr, folders=(run,))


@pytest.mark.parametrize("case", ["missing bucket", "wrong secret key"])
def test_a_missing_bucket_or_refused_credentials_is_one_line_before_any_process_group(s3, split, tiny_assets,
                                                                                      tmp_path, case):
    remote = "s3://no-such-bucket/synthetic" if case == "missing bucket" else split["remote"]
    config = write_tiny_config(tiny_assets, tmp_path / "run", data={"train": [{"remote": remote}],
                                                                    "cache_dir": str(tmp_path / "cache")})
    env = clean_env(**s3.env(secret_key="wrong" + s3.secret_key[5:] if case == "wrong secret key" else None))
    r = subprocess.run([sys.executable, "-m", "blip_train.train", "--config", str(config)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    expected = {"missing bucket": f"cannot read {remote}: bucket 'no-such-bucket' does not exist at {s3.endpoint}",
                "wrong secret key": f"cannot read {remote}: access denied by {s3.endpoint} (HTTP 403): check the "
                                    "credentials in the environment"}[case]
    assert len(errors) == 1 and errors[0].startswith(f"config error: data.train[0].remote: {expected}"), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "world:" not in r.stdout  # printed once the process group exists
    _assert_no_credentials(s3, r.stdout, r.stderr, folders=(tmp_path,))
