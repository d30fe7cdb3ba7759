"""A tiny but real stage-1 experiment on disk: synthetic MDS data, a trained WordPiece tokenizer,
ViT weights in a safetensors file, and a YAML config that points at them. Used by the training,
resume and evaluation tests, which then run the real entry points on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from blip_train.data.synthetic import write_synthetic_dataset
from blip_train.data.tokenizers import train_wordpiece_tokenizer

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "drop_last_block": True, "heads": 4,
          "mlp_dim": 64, "precision": "bf16"}
QFORMER = {"hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64, "vocab_size": 256,
           "max_position_embeddings": 64, "cross_attention_freq": 2, "num_query_tokens": 4, "dropout": 0.1}


def make_tiny_assets(root: Path, num_samples: int = 120) -> dict:
    """Data + tokenizer + ViT weights under `root` (idempotent)."""
    from streaming import StreamingDataset

    from blip_train.config import VisionConfig
    from blip_train.models.eva_vit import EVAViT

    data = root / "data"
    if not (data / "train").is_dir():
        write_synthetic_dataset(data, num_samples=num_samples, seed=0, val_fraction=0.2, image_size=32)
    tok = root / "qformer_tokenizer"
    if not (tok / "tokenizer.json").is_file():
        ds = StreamingDataset(local=str(data / "train"), shuffle=False, batch_size=1)
        train_wordpiece_tokenizer([ds[i]["caption"] for i in range(len(ds))], vocab_size=200, out_dir=tok)
    vit = root / "vit.safetensors"
    if not vit.is_file():
        torch.manual_seed(0)
        model = EVAViT(VisionConfig(**VISION))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(vit))
    return {"data": data, "tokenizer": tok, "vit": vit}


def write_tiny_config(root: Path, out_dir: Path, **sections) -> Path:
    """A stage-1 YAML for the tiny assets; `sections` override per section, e.g. train={...}."""
    assets = make_tiny_assets(root)
    cfg = {
        "run": {"output_dir": str(out_dir), "seed": 0, "device": "cpu", "tensorboard": False},
        "model": {"arch": "stage1", "attention": "sdpa", "embed_dim": 16, "max_txt_len": 20,
                  "vision": dict(VISION, weights=str(assets["vit"])),
                  "qformer": dict(QFORMER, tokenizer=str(assets["tokenizer"]))},
        "data": {"train": [{"local": str(assets["data"] / "train"), "name": "synthetic"}],
                 "val": str(assets["data"] / "val"), "image_size": 32, "num_workers": 0, "hflip": False},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "train": {"max_steps": 6, "micro_batch_size": 4, "log_interval": 1, "save_interval": 3, "keep_last": 5},
        "eval": {"k_test": 8, "batch_size": 16},
        "deepspeed": {"config": "zero3_bf16", "zero_stage": 3, "precision": "bf16", "param_persistence_threshold": 0},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


TEXT = {"hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64, "vocab_size": 256,
        "max_position_embeddings": 64, "dropout": 0.1}


def write_tiny_blip_config(root: Path, out_dir: Path, arch: str = "blip", **sections) -> Path:
    """A BLIP (arch=blip: MED with decoder) or ALBEF (arch=albef: 1 text + 1 fusion layer) YAML on the tiny
    assets: the ViT trains from random init with a final norm; a 32-entry queue (4 global batches of 2 x 4)."""
    config = write_tiny_config(root, out_dir, **{k: v for k, v in sections.items() if k != "model"})
    data = yaml.safe_load(config.read_text())
    text = dict(TEXT, tokenizer=str(make_tiny_assets(root)["tokenizer"]),
                **({"fusion_layer": 0, "decoder": True} if arch == "blip" else {"fusion_layer": 1, "decoder": False}))
    data["model"] = {"arch": arch, "attention": "sdpa", "embed_dim": 16, "max_txt_len": 20,
                     "vision": dict(VISION, frozen=False, final_norm=True), "text": text,
                     "momentum": {"queue_size": 32, "alpha": 0.4, "alpha_ramp_steps": 2}}
    for key, value in sections.get("model", {}).items():  # nested sections (vision, text) are merged
        if isinstance(value, dict):
            data["model"][key] = {**data["model"].get(key, {}), **value}
        else:
            data["model"][key] = value
    config.write_text(yaml.safe_dump(data))
    return config


def read_losses(run_dir: Path) -> dict[int, float]:
    import json
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def run_train(config, *sets, nproc: int = 2, timeout: int = 600):
    """`torchrun -m blip_train.train --config CONFIG --set ...`; fails the test with the output on error."""
    from tests.conftest import torchrun

    args = ["-m", "blip_train.train", "--config", str(config)]
    for s in sets:
        args += ["--set", s]
    r = torchrun(args, nproc=nproc, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def train_and_dump(config, out: Path, *sets, nproc: int = 2, timeout: int = 600):
    """`run_train` through tests/distributed/_train_dump_script.py: the same `train()`, and then every parameter
    the live engine holds at the end ({"trainable": ..., "frozen": ...}, gathered) is written to `out`."""
    from tests.conftest import torchrun

    args = ["tests/distributed/_train_dump_script.py", str(out), "--config", str(config)]
    for s in sets:
        args += ["--set", s]
    r = torchrun(args, nproc=nproc, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def trainable_weights(run_dir: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)


def source_frozen_weights(config: Path) -> dict[str, torch.Tensor]:
    """The frozen towers as their sources give them, in the dtype the run holds them in (bf16)."""
    from safetensors.torch import load_file

    from blip_train.config import load_config

    cfg = load_config(str(config))
    vision = cfg.model.vision
    dropped = f"blocks.{vision.layers - 1}." if vision.drop_last_block else "-"
    out = {f"visual_encoder.{k}": v.to(torch.bfloat16) for k, v in load_file(vision.weights).items()
           if not k.startswith(dropped)}
    if cfg.model.arch != "stage1":
        from transformers import AutoModelForCausalLM
        llm = AutoModelForCausalLM.from_pretrained(cfg.model.llm.path, dtype=torch.bfloat16)
        out.update({f"llm.{k}": v.detach() for k, v in llm.named_parameters()})
    return out


def assert_frozen_is_source(dump: dict, config: Path) -> None:
    """The frozen parameters of a `train_and_dump` result equal their sources bit for bit."""
    source = source_frozen_weights(config)
    assert dump["frozen"].keys() == source.keys()
    for k, v in source.items():
        assert dump["frozen"][k].dtype == v.dtype and torch.equal(dump["frozen"][k], v), k


def config_with_output_dir(config: Path, run: Path) -> Path:
    """The same YAML with run.output_dir pointing at `run`."""
    data = yaml.safe_load(config.read_text())
    data["run"]["output_dir"] = str(run)
    out = run.parent / f"{run.name}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def assert_vqa_scores_are_earned(metrics: dict) -> None:
    """A VQA evaluation's scores are what its saved per-question predictions earn against their references, and
    its chance score what the majority answer earns: a range check (0 <= accuracy <= 100) passes on any bug."""
    from collections import Counter

    from blip_train.evaluation.vqa_metrics import vqa_score

    rows = json.loads(Path(metrics["predictions_file"]).read_text())["predictions"]
    assert len(rows) == metrics["num_questions"] > 0 and any(r["prediction"].strip() for r in rows), rows
    answers = {r["question_id"]: r["answers"] for r in rows}
    earned = vqa_score({r["question_id"]: r["prediction"] for r in rows}, answers)["overall"]
    majority = Counter(a for r in rows for a in r["answers"]).most_common(1)[0][0]
    chance = vqa_score({q: majority for q in answers}, answers)["overall"]
    assert (metrics["vqa_accuracy"], metrics["chance_vqa_accuracy"]) == pytest.approx((earned, chance)), metrics
