"""export_hf of fine-tuned stage-2 OPT models: LoRA adapters on the LLM merged into the exported LLM (default)
or written as a peft adapter folder beside the base weights, and a trained ViT at another resolution than its
source weights (position embeddings interpolated); transformers (+ peft) gives our logits (fp32, <= 1e-5) and
our greedy tokens."""
from __future__ import annotations

import json

import pytest

from blip_train.interop.hf_export import LORA_ADAPTER_DIR, export_hf
from tests.parity.test_export_hf_models import (assert_export_matches_ours, assets, build_ours,  # noqa: F401
                                                experiment, save_trained)

pytestmark = pytest.mark.parity


def _lora_experiment(assets) -> dict:  # noqa: F811
    cfg = experiment("stage2", assets, "opt")
    cfg["model"]["llm"]["lora"] = {"r": 4, "alpha": 8.0, "dropout": 0.0,
                                   "target_modules": ["q_proj", "v_proj", "fc2"]}
    return cfg


@pytest.mark.parametrize("as_adapter", [False, True], ids=["merged", "adapter_folder"])
def test_lora_export_matches_our_logits(as_adapter, assets, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    cfg = _lora_experiment(assets)
    ours = build_ours(cfg)  # adapters perturbed as training would (B is no longer zero)
    adapters = {n for n, p in ours.named_parameters() if p.requires_grad and ".lora_" in n}
    assert len(adapters) == 2 * 3 * 2
    summary = export_hf(save_trained(ours, cfg, tmp_path / "weights"), tmp_path / "hf", lora_adapter=as_adapter)
    folder = tmp_path / "hf" / LORA_ADAPTER_DIR
    assert summary["lora"] == (LORA_ADAPTER_DIR if as_adapter else "merged")
    assert folder.is_dir() == as_adapter
    if as_adapter:
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["r"] == 4 and saved["lora_alpha"] == 8.0
        assert set(saved["target_modules"]) == {"q_proj", "v_proj", "fc2"}
        assert len(load_file(str(folder / "adapter_model.safetensors"))) == len(adapters)
    assert_export_matches_ours(tmp_path / "hf", ours, "stage2", adapter=folder if as_adapter else None)


def test_adapters_matter_for_the_comparison(assets, tmp_path):  # noqa: F811
    """The base export without its adapter folder does NOT match: the parity above is not vacuous."""
    cfg = _lora_experiment(assets)
    ours = build_ours(cfg)
    export_hf(save_trained(ours, cfg, tmp_path / "weights"), tmp_path / "hf", lora_adapter=True)
    with pytest.raises(AssertionError):
        assert_export_matches_ours(tmp_path / "hf", ours, "stage2")


def test_lora_adapter_flag_needs_adapters(assets, tmp_path):  # noqa: F811
    from blip_train.interop.weights_io import InteropError

    cfg = experiment("stage2", assets, "opt")
    with pytest.raises(InteropError, match="no LoRA adapters"):
        export_hf(save_trained(build_ours(cfg), cfg, tmp_path / "w"), tmp_path / "hf", lora_adapter=True)


def test_export_tool_writes_the_adapter_folder_on_request(assets, tmp_path):  # noqa: F811
    import subprocess
    import sys

    from tests.conftest import REPO, clean_env

    cfg = _lora_experiment(assets)
    weights = save_trained(build_ours(cfg), cfg, tmp_path / "weights")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(weights),
                        "--out", str(tmp_path / "hf"), "--lora-adapter"], capture_output=True, text=True,
                       env=clean_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["lora"] == LORA_ADAPTER_DIR
    assert (tmp_path / "hf" / LORA_ADAPTER_DIR / "adapter_config.json").is_file()


def test_trained_vit_at_a_new_resolution_exports_with_our_logits(assets, tmp_path):  # noqa: F811
    cfg = experiment("stage2", assets, "opt")
    cfg["model"]["vision"].update(frozen=False, image_size=40, drop_path_rate=0.1)  # source weights: 32 px
    cfg["data"]["image_size"] = 40
    ours = build_ours(cfg)  # the ViT perturbed as training would; eval mode: no drop path
    assert ours.visual_encoder.pos_embed.shape[1] == 1 + 5 * 5 and ours.visual_encoder.pos_embed.requires_grad
    summary = export_hf(save_trained(ours, cfg, tmp_path / "weights"), tmp_path / "hf")
    assert summary["lora"] is None
    assert_export_matches_ours(tmp_path / "hf", ours, "stage2")
