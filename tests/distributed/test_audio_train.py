"""Audio captioning (model.modality=audio) through the real trainer: 2 ranks, ZeRO-3 with the frozen ASTModel
partitioned as it loads beside the LLM, an audio split written as the converters write it, the modality prefix
tokenized by the LLM's tokenizer; then `python -m blip_train.eval --task caption` on held-out clips, and export
refuses the run in one line; the documented path instead, model.init_from, loads every trained tensor."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import run_train, trainable_weights, write_tiny_config

pytestmark = pytest.mark.dist


def test_stage2_trains_and_captions_audio(tiny_assets, tmp_path):
    from blip_train.data.synthetic_audio import write_synthetic_audio_dataset
    from tests.distributed.test_export_generative import llm_folder
    from tests.unit.test_audio_model import save_tiny_ast

    data = tmp_path / "tones"
    write_synthetic_audio_dataset(data, num_samples=30, seconds=1.0, val_fraction=0.2)
    ast = save_tiny_ast(tmp_path / "ast")
    llm = {"path": str(llm_folder(tiny_assets, "opt")), "dtype": "bf16", "max_txt_len": 12}
    run = tmp_path / "run"
    config = write_tiny_config(
        tiny_assets, run,
        model={"arch": "stage2", "llm": llm, "modality": "audio", "modality_prefix": "audio: ",
               "audio": {"encoder": str(ast), "segments": 2}},
        data={"train": [{"local": str(data / "train"), "name": "tones"}], "val": str(data / "val")},
        train={"max_steps": 2, "save_interval": 2})
    out = run_train(config)
    assert "done: step 2" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    # The AST (2 layers of width 32) and the LLM were partitioned as transformers loaded them.
    partitioned = int(next(line for line in out.stdout.splitlines() if line.startswith("ZeRO-3: "))
                      .split()[1].replace(",", ""))
    from transformers import ASTModel
    assert partitioned > sum(p.numel() for p in ASTModel.from_pretrained(ast).parameters())
    meta = json.loads((run / "checkpoints" / "step_0000002" / "complete.json").read_text())
    assert meta["frozen_sources"]["audio"] == str(ast) and "vision" not in meta["frozen_sources"]
    weights = trainable_weights(run, "step_0000002")
    assert tuple(weights["frame_pos"].shape) == (2, 32) and tuple(weights["ln_vision.weight"].shape) == (32,)
    assert not any(k.startswith(("audio_encoder.", "visual_encoder.")) for k in weights)

    def cli(*args):
        return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                              timeout=600)

    e = cli("-m", "blip_train.eval", "--task", "caption", "--checkpoint", str(run), "--data", str(data / "val"),
            "--max-samples", "4")
    assert e.returncode == 0, e.stderr[-3000:]
    metrics = json.loads(e.stdout.strip().splitlines()[-1])
    assert metrics["num_images"] == 4 and metrics["cider"] >= 0
    # The frozen encoder is rebuilt from its recorded source, in the dtype it trained in, beside the trained weights.
    z = cli(str(REPO / "tools" / "zero_to_safetensors.py"), "--checkpoint", str(run), "--include-frozen",
            "--out", str(tmp_path / "full.safetensors"))
    assert z.returncode == 0, z.stderr[-3000:]
    from safetensors.torch import load_file
    full = load_file(str(tmp_path / "full.safetensors"))
    source = ASTModel.from_pretrained(ast).state_dict()
    assert {k[len("audio_encoder.ast."):] for k in full if k.startswith("audio_encoder.")} == set(source)
    key = "encoder.layer.0.attention.attention.query.weight"
    assert full[f"audio_encoder.ast.{key}"].float().equal(source[key].bfloat16().float())
    # What users load instead of a transformers class: the run (or its zero_to_safetensors file) as
    # model.init_from of an audio model, which takes every trained tensor, the segment embeddings included.
    from blip_train.config import load_config
    from blip_train.training.stages import build_llm_stage_model
    cfg = load_config(str(config), [f"model.init_from={tmp_path / 'full.safetensors'}"])
    model, _, report = build_llm_stage_model(cfg, "cpu")
    assert report["missing"] == [] and "frame_pos" in report["loaded"] and "llm_proj.weight" in report["loaded"]
    assert model.frame_pos.detach().float().equal(weights["frame_pos"].float())
    x = cli(str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert x.returncode == 2 and "model.modality=audio" in x.stderr and len(x.stderr.strip().splitlines()) == 1
    # X-InstructBLIP's inference: this audio run and an image run on the same LLM answer together through it,
    # from their run folders; with one input missing, the other answers as it does alone.
    image_run = tmp_path / "image_run"
    image_config = write_tiny_config(tiny_assets, image_run, model={"arch": "stage2", "llm": llm},
                                     train={"max_steps": 2, "save_interval": 2})
    assert "done: step 2" in run_train(image_config).stdout
    import torch

    from blip_train.data.audio import model_audio_features
    from blip_train.models.modalities import load_modalities
    ensemble, tokenizer = load_modalities({"image": image_run, "audio": run})
    image, audio = ensemble.branches["image"], ensemble.branches["audio"]
    assert image.llm is audio.llm and audio.frame_pos.detach().equal(weights["frame_pos"].float())
    from streaming import StreamingDataset
    row = StreamingDataset(local=str(data / "val"), shuffle=False, batch_size=1)[0]
    sound = model_audio_features(cfg.model)(row)[None]  # (1, segments, frames, bins)
    pixels = torch.rand(1, 3, 32, 32)
    options = dict(num_beams=1, max_new_tokens=5)
    with torch.no_grad():
        assert torch.equal(ensemble.generate({"audio": sound, "image": None}, **options),
                           audio.generate(sound, **options))
        both = ensemble.generate({"image": pixels, "audio": sound}, **options)
    assert both.shape[0] == 1 and tokenizer.decode(both[0], skip_special_tokens=True) is not None

