"""Fine-tuning under ZeRO-3 on 2 ranks, built as the trainer builds it.

- A training ViT (model.vision.frozen=false) is partitioned, optimised from fp32 masters and updated like
  any trainable module, with layer-wise lr decay, drop path and activation checkpointing on.
- LoRA adapters on the frozen LLM (model.llm.lora), injected after the LLM loaded straight into partitions,
  are partitioned, optimised and updated the same way.
In both, every frozen LLM weight stays bit for bit what it was."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import torchrun
from tests.helpers.tiny_run import write_tiny_config

pytestmark = pytest.mark.dist
CASES = {
    "vit": ({"frozen": False, "drop_path_rate": 0.2, "grad_checkpointing": True}, {}, {"layer_decay": 0.8}),
    "lora": ({}, {"lora": {"r": 4, "alpha": 8.0, "dropout": 0.1}}, {}),
}


def _finetune_config(tiny_assets, out, vision: dict, llm: dict, optim: dict):
    from tests.distributed.test_export_generative import llm_folder

    config = write_tiny_config(tiny_assets, out, train={"max_steps": 3}, optim={"warmup_steps": 0, **optim})
    data = yaml.safe_load(config.read_text())
    data["model"]["arch"] = "stage2"
    data["model"]["llm"] = {"path": str(llm_folder(tiny_assets, "opt")), "dtype": "bf16", "max_txt_len": 12, **llm}
    data["model"]["vision"].update(vision)
    config.write_text(yaml.safe_dump(data))
    return config


def _trained(name: str, case: str) -> bool:
    if case == "vit":
        return name.startswith("visual_encoder.")
    return ".lora_A." in name or ".lora_B." in name


@pytest.mark.parametrize("case", list(CASES))
def test_trained_part_is_partitioned_and_updated_while_the_llm_stays_frozen(case, tiny_assets, tmp_path):
    config = _finetune_config(tiny_assets, tmp_path / "ft", *CASES[case])
    report = tmp_path / "report.json"
    r = torchrun(["tests/distributed/_finetune_script.py", str(config), str(report)], nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ranks = json.loads(report.read_text())["ranks"]
    for rep in ranks:
        params = rep["params"]
        trained = {n: p for n, p in params.items() if _trained(n, case)}
        frozen_llm = {n: p for n, p in params.items() if n.startswith("llm.") and not _trained(n, case)}
        assert trained and frozen_llm
        for name, p in trained.items():
            # Partitioned like any trainable module: half of it on each rank, none whole.
            assert p["ds_id"] and p["local_numel"] == 0 and p["shard"] == (p["ds_numel"] + 1) // 2, name
            # Computed in the engine's bf16, stepped from fp32 masters of the rank's own shard.
            assert p["requires_grad"] and p["dtype"] == "torch.bfloat16", name
            assert p["master_dtype"] == "torch.float32" and p["master_numel"] == p["shard"], name
            assert p["optimizer_state"], name
            assert p["master_changed"], name
        # The bf16 working copies follow (a weight near 1.0 may not move in bf16 in 3 small steps).
        assert sum(p["changed"] for p in trained.values()) > len(trained) // 2
        for name, p in frozen_llm.items():
            assert p["ds_id"] and p["shard"] == (p["ds_numel"] + 1) // 2, name
            assert not p["requires_grad"] and p["master_dtype"] is None, name
            assert not p["changed"], name  # bit for bit
        if case == "vit":
            assert rep["train_mode"]
            depth = 2  # 3 pretrained blocks, the last dropped
            expected = sorted({1.0, 0.8 ** (depth + 1)} | {0.8 ** (depth - i) for i in range(depth)})
            assert rep["lr_scales"] == pytest.approx(expected)
            top = max(lr for s, lr in rep["group_lrs"] if s == 1.0)
            for scale, lr in rep["group_lrs"]:
                assert lr == pytest.approx(top * scale)
        else:
            assert all(".base_layer." in n for n in frozen_llm if n.endswith(("q_proj.weight", "v_proj.weight"))) \
                and any(".base_layer." in n for n in frozen_llm)
            assert rep["lr_scales"] == [1.0]


def test_lora_adapters_must_be_injected_after_the_partitioned_load(tiny_assets):
    """Why apply_lora_ runs after the LLM is loaded and refuses adapters built inside zero.Init."""
    from tests.distributed.test_export_generative import llm_folder

    r = torchrun(["tests/distributed/_lora_zero_init_script.py", str(llm_folder(tiny_assets, "opt"))], nproc=1,
                 timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert out["base_partitioned"] and out["after_load_whole"] and out["after_load_b_zero"]
    assert out["inside_zero_init"].startswith("LoRA adapters were built inside deepspeed.zero.Init")
