"""Fine-tuning under ZeRO-3 on 2 ranks: a training ViT is partitioned, optimised from fp32 masters and
updated like any trainable module, with layer-wise lr decay, drop path and activation checkpointing on,
while the frozen LLM of a stage-2 model stays bit for bit what it was."""
from __future__ import annotations

import json

import pytest

from tests.conftest import torchrun
from tests.helpers.tiny_run import write_tiny_config

pytestmark = pytest.mark.dist


def test_trainable_vit_is_partitioned_and_updated_while_the_llm_stays_frozen(tiny_assets, tmp_path):
    from tests.distributed.test_export_generative import llm_folder

    llm = {"path": str(llm_folder(tiny_assets, "opt")), "dtype": "bf16", "max_txt_len": 12}
    vision = {"frozen": False, "drop_path_rate": 0.2, "grad_checkpointing": True}
    config = write_tiny_config(tiny_assets, tmp_path / "ft", train={"max_steps": 3},
                               optim={"layer_decay": 0.8, "warmup_steps": 0})
    import yaml
    data = yaml.safe_load(config.read_text())
    data["model"]["arch"] = "stage2"
    data["model"]["llm"] = llm
    data["model"]["vision"].update(vision)
    config.write_text(yaml.safe_dump(data))
    report = tmp_path / "report.json"
    r = torchrun(["tests/distributed/_finetune_script.py", str(config), str(report)], nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ranks = json.loads(report.read_text())["ranks"]
    depth = 2  # 3 pretrained blocks, the last dropped
    for rep in ranks:
        params = rep["params"]
        vit = {n: p for n, p in params.items() if n.startswith("visual_encoder.")}
        llm_params = {n: p for n, p in params.items() if n.startswith("llm.")}
        assert vit and llm_params
        for name, p in vit.items():
            # Partitioned like any trainable module: half of it on each rank, none whole.
            assert p["ds_id"] and p["local_numel"] == 0 and p["shard"] == (p["ds_numel"] + 1) // 2, name
            # Computed in the engine's bf16, stepped from fp32 masters of the rank's own shard.
            assert p["requires_grad"] and p["dtype"] == "torch.bfloat16", name
            assert p["master_dtype"] == "torch.float32" and p["master_numel"] == p["shard"], name
            assert p["optimizer_state"], name
            assert p["master_changed"], name
        for name, p in llm_params.items():
            assert p["ds_id"] and p["shard"] == (p["ds_numel"] + 1) // 2, name
            assert not p["requires_grad"] and p["master_dtype"] is None, name
            assert not p["changed"], name  # bit for bit
        assert sum(p["changed"] for p in vit.values()) > len(vit) // 2  # the bf16 working copies follow
        assert rep["train_mode"]
        expected = sorted({1.0, 0.8 ** (depth + 1)} | {0.8 ** (depth - i) for i in range(depth)})
        assert rep["lr_scales"] == pytest.approx(expected)
        top = max(lr for s, lr in rep["group_lrs"] if s == 1.0)
        for scale, lr in rep["group_lrs"]:
            assert lr == pytest.approx(top * scale)
