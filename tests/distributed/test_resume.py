"""Interruptions on 2 ranks: SIGKILL, preemption (SIGUSR1) and a half-written checkpoint.

Each interrupted run is restarted with the same command and must reproduce the uninterrupted run's
losses step for step and its final weights bit for bit (same world size).
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, clean_env, free_port, kill_process_tree
from tests.helpers.tiny_run import (assert_frozen_is_source, read_losses, run_train, train_and_dump,
                                    trainable_weights, write_tiny_config)

pytestmark = pytest.mark.dist
STEPS = 8
SCHEDULE = {"max_steps": STEPS, "save_interval": 2, "keep_last": 10}


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    run_train(write_tiny_config(tiny_assets, run, train=SCHEDULE))
    return run


def _start(config: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "blip_train.train", "--config", str(config)]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError("run ended before the interruption point:\n" + proc.stdout.read()[-3000:])
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


def _kill_all(proc: subprocess.Popen) -> None:
    kill_process_tree(proc)
    proc.wait()


def _assert_same_as_reference(run: Path, reference: Path) -> None:
    a, b = read_losses(reference), read_losses(run)  # later lines win: the resumed run's values
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert b[step] == a[step], f"step {step}: resumed {b[step]} != uninterrupted {a[step]}"
    tag = f"step_{STEPS:07d}"
    wa, wb = trainable_weights(reference, tag), trainable_weights(run, tag)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_mid_run_then_restart_is_exact(tiny_assets, tmp_path, reference):
    run = tmp_path / "killed"
    config = write_tiny_config(tiny_assets, run, train=SCHEDULE)
    proc = _start(config)
    _wait_for(run / "checkpoints" / "latest", proc)
    _kill_all(proc)
    r = run_train(config)
    assert "resumed from" in r.stdout
    resumed_at = int(r.stdout.split("resumed from")[1].split("step_")[1][:7])
    assert resumed_at < STEPS
    _assert_same_as_reference(run, reference)


def test_sigusr1_saves_exits_cleanly_and_resumes_exactly(tiny_assets, tmp_path, reference):
    run = tmp_path / "preempted"
    config = write_tiny_config(tiny_assets, run, train=dict(SCHEDULE, save_interval=100))
    proc = _start(config)
    _wait_for(run / "metrics.jsonl", proc)  # training has started
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "blip_train.train" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)  # one rank only: all must agree to stop
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "checkpoint saved at step" in out
    tags = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(tags) == 1 and int(tags[0][5:]) < STEPS
    r = run_train(config)
    assert f"resumed from {run / 'checkpoints' / tags[0]}" in r.stdout
    _assert_same_as_reference(run, reference)


def test_half_written_checkpoint_is_ignored(tiny_assets, tmp_path, reference):
    run = tmp_path / "torn"
    config = write_tiny_config(tiny_assets, run, train=dict(SCHEDULE, max_steps=STEPS))
    run_train(config, "train.max_steps=4")  # schedule differs, only the checkpoint files matter here
    ckpt = run / "checkpoints"
    # Pretend the step-4 save was killed mid-write: no completion marker, a truncated shard, stale `latest`.
    (ckpt / "step_0000004" / "complete.json").unlink()
    shard = next((ckpt / "step_0000004").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    from blip_train.training.checkpoint import find_resume_tag
    assert find_resume_tag(ckpt) == "step_0000002"
    shutil.rmtree(run / "tb", ignore_errors=True)


def test_elastic_resume_two_ranks_to_one(tiny_assets, tmp_path):
    """2 → 1 rank: universal conversion, global batch kept by accumulation, frozen ViT from its source."""
    run = tmp_path / "elastic"
    config = write_tiny_config(tiny_assets, run, train=dict(SCHEDULE, save_interval=4, max_steps=6))
    proc = _start(config)
    _wait_for(run / "checkpoints" / "latest", proc)  # step 4 saved on 2 ranks
    _kill_all(proc)
    r = train_and_dump(config, tmp_path / "live.pt", nproc=1)
    assert "converting to a universal checkpoint" in r.stdout
    assert "train.grad_accum_steps: 1 -> 2 to keep the global batch at 8 on 1 ranks" in r.stdout
    losses = read_losses(run)
    assert sorted(losses) == list(range(1, 7)) and all(v == v for v in losses.values())
    assert (run / "checkpoints" / "step_0000004_universal").is_dir()
    meta = json.loads((run / "checkpoints" / "step_0000006" / "complete.json").read_text())
    assert meta["world_size"] == 1 and meta["global_batch"] == 8
    # The universal format carries no frozen weights (and our checkpoints none at all): the live ViT at the
    # end must still be exactly its source (in bf16).
    assert_frozen_is_source(torch.load(tmp_path / "live.pt", weights_only=True), config)


def test_instruct_t5_resume_is_exact(tiny_assets, tmp_path):
    """InstructBLIP with FlanT5 draws per sample (instruction template; the T5 prefix split for caption
    rows in stage 2 shares the mechanism): a run resumed from its step-2 checkpoint must redo steps 3-4
    exactly as the uninterrupted run did them."""
    from tests.distributed.test_export_generative import llm_folder

    llm = {"path": str(llm_folder(tiny_assets, "t5")), "dtype": "bf16", "max_txt_len": 12, "max_prompt_len": 16}
    schedule = {"max_steps": 4, "save_interval": 2, "keep_last": 10}
    full = tmp_path / "full"
    run_train(write_tiny_config(tiny_assets, full, model={"arch": "instruct", "llm": llm}, train=schedule))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002")
    out = run_train(write_tiny_config(tiny_assets, resumed, model={"arch": "instruct", "llm": llm}, train=schedule))
    assert "resumed from" in out.stdout and "at step 2" in out.stdout
    a, b = read_losses(full), read_losses(resumed)
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in (3, 4)), (a, b)
    wa, wb = trainable_weights(full, "step_0000004"), trainable_weights(resumed, "step_0000004")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
