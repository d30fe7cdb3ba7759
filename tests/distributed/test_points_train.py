"""3D question answering (model.modality=3d) through the real trainer: 2 ranks, ZeRO-3 with the frozen Point-BERT
built whole and partitioned by the engine with the model, a point-cloud split as the converters write it, the question in the
Q-Former and the LLM (InstructBLIP's instruction path); then `python -m blip_train.eval --task vqa` on held-out
clouds, the frozen tower rebuilt from its recorded source, and export refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import assert_vqa_scores_are_earned, run_train, trainable_weights, write_tiny_config

pytestmark = pytest.mark.dist


def test_instruct_trains_and_answers_about_point_clouds(tiny_assets, tmp_path):
    from blip_train.data.synthetic_points import write_synthetic_points_dataset
    from blip_train.models.point_encoder import load_point_encoder
    from tests.distributed.test_export_generative import llm_folder
    from tests.unit.test_point_model import NUM_POINTS, save_tiny_point_bert

    data = tmp_path / "solids"
    write_synthetic_points_dataset(data, num_clouds=12, num_points=NUM_POINTS, val_fraction=0.25)
    encoder = save_tiny_point_bert(tmp_path / "point_bert")
    llm = {"path": str(llm_folder(tiny_assets, "opt")), "dtype": "bf16", "max_txt_len": 8, "max_prompt_len": 24}
    run = tmp_path / "run"
    config = write_tiny_config(
        tiny_assets, run,
        model={"arch": "instruct", "llm": llm, "modality": "3d", "modality_prefix": "3d: ",
               "points": {"encoder": str(encoder), "num_points": NUM_POINTS}},
        data={"train": [{"local": str(data / "train"), "name": "solids"}], "val": str(data / "val")},
        train={"max_steps": 2, "save_interval": 2})
    out = run_train(config)
    assert "done: step 2" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    tower = load_point_encoder(encoder)
    line = next(line.split() for line in out.stdout.splitlines() if line.strip().startswith("points_encoder "))
    assert line[1:5] == ["trainable", "0", "frozen", f"{sum(p.numel() for p in tower.parameters()):,d}"], line
    meta = json.loads((run / "checkpoints" / "step_0000002" / "complete.json").read_text())
    assert meta["frozen_sources"]["3d"] == str(encoder) and "vision" not in meta["frozen_sources"]
    assert meta["frozen"]["points_encoder"]["dtype"] == "bfloat16"
    weights = trainable_weights(run, "step_0000002")
    assert "frame_pos" not in weights and tuple(weights["ln_vision.weight"].shape) == (tower.width,)
    # Of the frozen tower only its BatchNorm statistics (buffers, which DeepSpeed saves with the module) are there.
    assert {k for k in weights if k.startswith("points_encoder.")} == {
        f"points_encoder.{k}" for k, _ in tower.named_buffers()}
    assert not any(k.startswith("visual_encoder.") for k in weights)

    def cli(*args):
        return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                              timeout=600)

    e = cli("-m", "blip_train.eval", "--task", "vqa", "--checkpoint", str(run), "--data", str(data / "val"),
            "--max-samples", "6")
    assert e.returncode == 0, e.stderr[-3000:]
    metrics = json.loads(e.stdout.strip().splitlines()[-1])
    assert metrics["num_questions"] == 6
    assert_vqa_scores_are_earned(metrics)
    z = cli(str(REPO / "tools" / "zero_to_safetensors.py"), "--checkpoint", str(run), "--include-frozen",
            "--out", str(tmp_path / "full.safetensors"))
    assert z.returncode == 0, z.stderr[-3000:]
    from safetensors.torch import load_file
    full = load_file(str(tmp_path / "full.safetensors"))
    source = dict(tower.named_parameters())
    # The whole tower: its parameters from the source, its BatchNorm statistics from the checkpoint.
    assert {k[len("points_encoder."):] for k in full if k.startswith("points_encoder.")} == set(tower.state_dict())
    key = "blocks.blocks.0.attn.qkv.weight"
    assert full[f"points_encoder.{key}"].float().equal(source[key].bfloat16().float())
    x = cli(str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert x.returncode == 2 and "model.modality=3d" in x.stderr and len(x.stderr.strip().splitlines()) == 1
