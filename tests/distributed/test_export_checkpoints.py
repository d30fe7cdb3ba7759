"""Consolidation and export of real 2-rank checkpoints: the merged ZeRO-3 / ZeRO-2 shards equal what the
live engine held; the stage-1 export loads into transformers' Blip2ForImageTextRetrieval with no
missing or unexpected keys and gives our ITC / ITM logits; model.init_from takes the consolidated
folder; bad inputs fail with one line. The tools run as users run them (the first in its own process, no GPU,
no process group; the others in this process, through the same CLI entry)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_train.interop.consolidate import consolidate_checkpoint
from blip_train.interop.weights_io import INDEX_FILE, InteropError, read_weights
from tests.conftest import REPO, clean_env, torchrun
from tests.helpers.tiny_run import write_tiny_config
from tests.unit.test_tools_convert import run as run_cli

pytestmark = pytest.mark.dist
TOOLS = REPO / "tools"


def live_run(root: Path, name: str, deepspeed: dict) -> tuple[Path, dict]:
    """(run dir, gathered live weights) of a 2-step 2-rank run that saved one checkpoint."""
    config = write_tiny_config(root, root / name, deepspeed=deepspeed)
    live = root / f"{name}_live.pt"
    r = torchrun(["tests/distributed/_export_live_script.py", str(config), str(live)], nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return root / name, torch.load(live, weights_only=True)


@pytest.fixture(scope="module")
def zero3_fp32(tiny_assets) -> tuple[Path, dict]:
    # fp32 training: the live module weights ARE the master weights, so equality is exact.
    template = tiny_assets / "zero3_fp32.json"
    template.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return live_run(tiny_assets, "export_z3", {"config": str(template), "zero_stage": 3, "precision": "fp32",
                                               "param_persistence_threshold": 0})


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """The tool as users run it: its own process, no GPU, no process group."""
    return subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True, text=True,
                          env=clean_env(), cwd=REPO, timeout=600)


def assert_one_line_failure(result: tuple[int, str, str], *fragments: str) -> None:
    code, out, err = result
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_zero3_consolidation_equals_live_engine(zero3_fp32, tmp_path, capsys):
    run, live = zero3_fp32
    r = tool("zero_to_safetensors.py", "--checkpoint", str(run), "--out", str(tmp_path / "trained.safetensors"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["contents"] == "trainable"
    trained, meta = read_weights(tmp_path / "trained.safetensors")
    assert trained.keys() == live["trainable"].keys()
    for k, v in live["trainable"].items():
        assert trained[k].dtype == torch.float32 and torch.equal(trained[k], v), k
    assert meta["source"]["zero_stage"] == 3 and meta["source"]["world_size"] == 2 and meta["source"]["step"] == 2
    assert meta["config"]["model"]["arch"] == "stage1"
    # BERT's tie: the LM head's decoder IS the word-embedding matrix; stored once, named in the metadata.
    assert meta["tied"] == {"qformer.lm_head.decoder.weight": "qformer.embeddings.word_embeddings.weight"}

    # Everything, sharded small: an HF-style index, and the frozen ViT exactly as the live engine held it.
    code, _, err = run_cli("zero_to_safetensors.py", "--checkpoint", str(run / "checkpoints" / "step_0000002"),
                           "--out", str(tmp_path / "all"), "--include-frozen", "--max-shard-size", "40KB",
                           capsys=capsys)
    assert code == 0, err
    index = json.loads((tmp_path / "all" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    every, meta = read_weights(tmp_path / "all")
    assert meta["contents"] == "trainable+frozen" and meta["frozen_modules"] == ["visual_encoder"]
    assert every.keys() == live["trainable"].keys() | live["frozen"].keys()
    for k, v in live["frozen"].items():
        assert v.dtype == torch.bfloat16 and torch.equal(every[k], v.float()), k

    run_cli("zero_to_safetensors.py", "--checkpoint", str(run), "--out", str(tmp_path / "bf16"), "--dtype", "bf16",
            capsys=capsys)
    half, _ = read_weights(tmp_path / "bf16")
    assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in live["trainable"].items())


def test_zero2_bf16_consolidation_equals_live_engine(tiny_assets):
    run, live = live_run(tiny_assets, "export_z2", {"config": "zero2", "zero_stage": 2, "precision": "bf16"})
    merged = consolidate_checkpoint(run, include_frozen=True)
    assert merged.meta["source"]["zero_stage"] == 2 and set(merged.trainable) == set(live["trainable"])
    for k, v in live["trainable"].items():  # the live bf16 weights are the rounded fp32 master weights
        master = merged.tensors[k].contiguous()
        assert master.dtype == torch.float32 and torch.equal(master.to(torch.bfloat16), v), k
    for k, v in live["frozen"].items():
        assert torch.equal(merged.tensors[k].contiguous(), v), k


def test_retrieval_export_loads_in_transformers_and_matches_our_logits(zero3_fp32, tmp_path, capsys):
    from dataclasses import replace

    import torch.nn.functional as F
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    from blip_train.eval import load_run_config
    from blip_train.training.stages import build_stage1_model
    from blip_train.training.weights import init_stage1_from_

    run, _ = zero3_fp32
    code, out, err = run_cli("export_hf.py", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), capsys=capsys)
    assert code == 0, out[-2000:] + err[-3000:]
    left_out = set(json.loads(out.strip().splitlines()[-1])["left_out"])  # no place in transformers
    assert left_out == {"temp", "qformer.lm_head.decoder.bias"} | {
        f"qformer.lm_head.{m}.{p}" for m in ("dense", "norm") for p in ("weight", "bias")}
    hf, info = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()

    cfg, _, _ = load_run_config(str(run), [])
    cfg = replace(cfg, model=replace(cfg.model, vision=replace(cfg.model.vision, precision="fp32")))
    ours, tokenizer = build_stage1_model(cfg, device_type="cpu")
    assert init_stage1_from_(ours, run) == []
    ours.eval()
    processor = Blip2Processor.from_pretrained(str(tmp_path / "hf"))
    texts = ["a red circle", "two blue squares on the left", "a green triangle"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = processor.tokenizer(texts, padding=True, return_tensors="pt")
    ids, am = t["input_ids"], t["attention_mask"]
    assert torch.equal(ids, tokenizer(texts, padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        want_itc = hf(pixel_values=x, input_ids=ids, attention_mask=am).logits_per_image  # (B_img, B_txt)
        want_itm = hf(pixel_values=x, input_ids=ids, attention_mask=am,
                      use_image_text_matching_head=True).logits_per_image  # (B, 2)
        image_embeds, image_feats = ours.encode_image(x)  # (B, Nimg, W), (B, Nq, E)
        text_feat = ours.encode_text(ids, am)  # (B, E)
        got_itc = torch.einsum("iqe,te->iqt", image_feats, text_feat).max(dim=1).values
        got_itm = ours._itm_logits(image_embeds, ids, am)  # (B, 2)
    assert (got_itc - want_itc).abs().max() <= 1e-5
    assert (got_itm - want_itm).abs().max() <= 1e-5
    assert F.softmax(got_itm, -1).shape == (3, 2)


def test_init_from_takes_the_consolidated_folder(zero3_fp32, tmp_path):
    from blip_train.eval import load_run_config
    from blip_train.training.stages import build_stage1_model
    from blip_train.training.weights import init_stage1_from_

    run, live = zero3_fp32
    consolidated = consolidate_checkpoint(run)
    from blip_train.interop.weights_io import write_weights
    write_weights(consolidated.tensors, tmp_path / "w", consolidated.meta)
    cfg, _, _ = load_run_config(str(run), [])
    model, _ = build_stage1_model(cfg, device_type="cpu")
    assert init_stage1_from_(model, tmp_path / "w") == []
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k].detach(), v) for k, v in live["trainable"].items())

    # `eval --untrained` of a run that started from those weights evaluates them, not a random init
    from blip_train.training.stages import load_trained_retrieval_model
    cfg.model.init_from = str(tmp_path / "w")
    step0, _ = load_trained_retrieval_model(cfg, run / "checkpoints", "unused", untrained=True, device_type="cpu")
    params = dict(step0.named_parameters())
    assert all(torch.equal(params[k].detach(), v) for k, v in live["trainable"].items())


def test_bad_inputs_fail_with_one_line(zero3_fp32, tmp_path, capsys):
    run, _ = zero3_fp32
    assert_one_line_failure(run_cli("zero_to_safetensors.py", "--checkpoint", str(tmp_path), "--out",
                                    str(tmp_path / "o.safetensors"), capsys=capsys), "not a checkpoint")
    assert_one_line_failure(run_cli("zero_to_safetensors.py", "--checkpoint", str(run), "--tag", "step_0000099",
                                    "--out", str(tmp_path / "o.safetensors"), capsys=capsys),
                            "no checkpoint tag step_0000099", "step_0000002")
    # Weights whose shapes disagree with the config they carry (ITC width 16 vs 24).
    merged = consolidate_checkpoint(run)
    merged.meta["config"]["model"]["embed_dim"] = 24
    from blip_train.interop.weights_io import write_weights
    write_weights(merged.tensors, tmp_path / "w", merged.meta)
    capsys.readouterr()  # DeepSpeed's progress bar from the merge above
    assert_one_line_failure(run_cli("export_hf.py", "--checkpoint", str(tmp_path / "w"), "--out",
                                    str(tmp_path / "hf"), capsys=capsys),
                            "vision_proj.weight has shape (16, 32)", "(24, 32)")
    (tmp_path / "taken").mkdir()
    assert_one_line_failure(run_cli("export_hf.py", "--checkpoint", str(run), "--out", str(tmp_path / "taken"),
                                    capsys=capsys), "--overwrite")
    # In process: an interrupted save (no complete.json) and an unknown tag format.
    partial = tmp_path / "partial" / "checkpoints"
    shutil.copytree(run / "checkpoints" / "step_0000002", partial / "step_0000004")
    (partial / "step_0000004" / "complete.json").unlink()
    with pytest.raises(InteropError, match="incomplete checkpoint"):
        consolidate_checkpoint(partial / "step_0000004")
    with pytest.raises(InteropError, match="not a checkpoint tag"):
        consolidate_checkpoint(run, tag="latest")
    # --include-frozen reads the frozen ViT from the source complete.json records (the shards have none).
    moved = tmp_path / "moved" / "checkpoints"
    shutil.copytree(run / "checkpoints" / "step_0000002", moved / "step_0000002")
    shutil.copy(run / "config.yaml", moved.parent / "config.yaml")
    meta = json.loads((moved / "step_0000002" / "complete.json").read_text())
    meta["frozen_sources"]["vision"] = str(tmp_path / "gone.safetensors")
    (moved / "step_0000002" / "complete.json").write_text(json.dumps(meta))
    consolidate_checkpoint(moved)  # the trained parts alone need no source
    with pytest.raises(InteropError, match="source .*gone.safetensors \\(model.vision.weights, recorded in"):
        consolidate_checkpoint(moved, include_frozen=True)
