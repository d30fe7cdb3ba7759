"""A new user's first day with the training entry point: bad input refused in one line before any work,
Ctrl-C saves and resumes, a changed config is not resumed silently, the console says where it is."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import write_tiny_config

pytestmark = pytest.mark.e2e


def train(config: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "blip_train.train", "--config", str(config), *args]
    return subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_bad_input_is_refused_in_one_line_before_any_work(tiny_assets, tmp_path):
    run = tmp_path / "run"
    config = write_tiny_config(tiny_assets, run)
    t0 = time.time()
    msg = one_line_error(train(config, "--set", "model.vision.weights=/nowhere/eva_vit_g.safetensors"))
    assert msg == "config error: model.vision.weights: /nowhere/eva_vit_g.safetensors does not exist"
    assert not run.exists()  # nothing left behind, not even config.yaml
    msg = one_line_error(train(config, "--set", "data.train=[{local: d1"))
    assert msg.startswith("config error: --set data.train=[{local: d1: not valid YAML (") and "quote the value" in msg
    msg = one_line_error(train(config, "--set", "eval.interval=2", "--set", "data.val=/nowhere/val"))
    assert msg == "config error: data.val: /nowhere/val does not exist"
    broken = tmp_path / "broken.yaml"
    broken.write_text("run:\n  seed: 1\n model: [\n")
    msg = one_line_error(train(broken))
    assert "not valid YAML" in msg and "line 3, column 2" in msg
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    msg = one_line_error(train(config, "--set", f"run.output_dir={blocker}/run"))
    assert msg.startswith(f"config error: run.output_dir: {blocker}/run is not writable (")
    assert time.time() - t0 < 60  # refused at start, not after building models


def _start(config: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "blip_train.train", "--config", str(config), *args]
    return subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_ctrl_c_saves_prints_how_to_resume_and_the_same_command_resumes(tiny_assets, tmp_path):
    run = tmp_path / "run"
    config = write_tiny_config(tiny_assets, run, train={"max_steps": 30, "log_interval": 1, "save_interval": 1000})
    proc = _start(config)
    log = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    stopped = [line for line in out.splitlines() if line.startswith("stop requested (SIGINT)")]
    assert len(stopped) == 1 and stopped[0].endswith("; run the same command to resume"), out[-2000:]
    step = int(stopped[0].split("checkpoint saved at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step_{step:07d}" / "complete.json").is_file()
    assert step < 30
    again = train(config)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step:07d}'} at step {step}" in again.stdout
    assert "done: step 30, checkpoint " in again.stdout


def test_changed_config_is_refused_on_resume_unless_allowed_and_every_config_is_kept(tiny_assets, tmp_path):
    from tests.helpers.tiny_run import VISION

    run = tmp_path / "run"
    config = write_tiny_config(tiny_assets, run, train={"max_steps": 2, "save_interval": 2},
                               model={"vision": dict(VISION, weights="")})  # a random frozen ViT: warned about
    first = train(config)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done: step 2, checkpoint " in first.stdout and (run / "train.log").read_text().count("done: step 2") == 1
    # What the console says: the streams, step N/total with elapsed time and ETA, each checkpoint; not
    # DeepSpeed's start-up chatter.
    out = first.stdout
    assert "warning: model.vision.weights is empty: the frozen ViT is randomly initialised, which is for tests" in out
    assert "data.train:\n  synthetic" in out and "96 samples" in out
    step_line = next(line for line in out.splitlines() if line.startswith("step 1/2 | loss "))
    assert " elapsed 00:00:" in step_line and " ETA 00:" in step_line
    assert f"checkpoint saved: {run / 'checkpoints' / 'step_0000002'} (" in out
    both = first.stdout + first.stderr
    assert not [w for w in ("Setting accelerator to CPU", "built successfully", "No CUDA runtime") if w in both]
    recorded = (run / "config.yaml").read_text()
    changed = ["--set", "optim.lr=0.01", "--set", "train.max_steps=4", "--set", "train.log_interval=2"]
    msg = one_line_error(train(config, *changed))
    assert "resuming with a config that changes what the run means" in msg
    assert "optim.lr: 0.001 -> 0.01" in msg and "train.max_steps: 2 -> 4" in msg and "log_interval" not in msg
    assert "--allow-config-change" in msg
    assert (run / "config.yaml").read_text() == recorded and not (run / "config.1.yaml").exists()
    allowed = train(config, *changed, "--allow-config-change")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "config changed on resume (allowed): optim.lr: 0.001 -> 0.01" in allowed.stdout
    assert (run / "config.yaml").read_text() == recorded
    assert yaml.safe_load((run / "config.1.yaml").read_text())["optim"]["lr"] == 0.01
    meta = json.loads((run / "checkpoints" / "step_0000004" / "complete.json").read_text())
    assert meta["config_file"] == "config.1.yaml"
    operational = train(config, *changed, "--set", "train.log_interval=1")  # nothing to resume: already done
    assert operational.returncode == 0 and (run / "config.2.yaml").is_file()


def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous(tiny_assets, tmp_path):
    run = tmp_path / "run"
    config = write_tiny_config(tiny_assets, run, train={"max_steps": 4, "save_interval": 2})
    assert train(config).returncode == 0
    newest = run / "checkpoints" / "step_0000004"
    files = json.loads((newest / "complete.json").read_text())["files"]
    assert files and all((newest / name).stat().st_size == size for name, size in files.items())
    optim = next(newest.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:1000])  # a disk that filled up, a copy cut short
    for tool in ("zero_to_safetensors.py", "export_hf.py"):  # the tools refuse it in one line, naming the file
        r = subprocess.run([sys.executable, f"tools/{tool}", "--checkpoint", str(run), "--out", str(tmp_path / tool)],
                           env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
        assert f"step_0000004 is damaged: {optim.name}: 1,000 bytes, " in r.stderr and "Traceback" not in r.stderr
    resumed = train(config)  # the same command: resumes from step 2 and trains steps 3-4 again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"checkpoint {newest} is damaged ({optim.name}: 1,000 bytes, " in resumed.stdout
            and "using the previous complete checkpoint" in resumed.stdout)
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2" in resumed.stdout
    assert "done: step 4, checkpoint " in resumed.stdout
    files = json.loads((newest / "complete.json").read_text())["files"]
    assert all((newest / name).stat().st_size == size for name, size in files.items())  # saved whole again
