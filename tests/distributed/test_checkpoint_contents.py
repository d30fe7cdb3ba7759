"""What a checkpoint holds: the trainable state and its optimizer, never the frozen towers; and resuming
from it (same world size, ZeRO-2 and ZeRO-3, with and without a frozen LLM) is exact while the frozen
towers stay bit for bit what their sources say."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers.tiny_run import (assert_frozen_is_source, config_with_output_dir, read_losses, run_train,
                                    train_and_dump, trainable_weights, write_tiny_config)

pytestmark = pytest.mark.dist
SCHEDULE = {"max_steps": 4, "save_interval": 2, "keep_last": 10}
CASES = {"stage1-zero3": ("stage1", 3), "stage1-zero2": ("stage1", 2), "stage2_opt-zero3": ("stage2", 3),
         "stage2_opt-zero2": ("stage2", 2)}  # ZeRO-2 with OPT's tied (frozen) lm_head / input embedding


def _sections(assets: Path, arch: str, zero: int) -> dict:
    from tests.distributed.test_export_generative import llm_folder

    sections = {"train": SCHEDULE, "deepspeed": {"config": "zero2" if zero == 2 else "zero3_bf16", "zero_stage": zero}}
    if arch == "stage2":
        sections["model"] = {"arch": "stage2", "llm": {"path": str(llm_folder(assets, "opt")), "dtype": "bf16",
                                                       "max_txt_len": 12}}
    return sections


@pytest.fixture(scope="module")
def full_runs(tiny_assets, tmp_path_factory):
    """case -> (config, run dir) of an uninterrupted 4-step 2-rank run saving at steps 2 and 4, run on demand."""
    runs: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in runs:
            run = tmp_path_factory.mktemp(case) / "full"
            config = write_tiny_config(tiny_assets, run, **_sections(tiny_assets, *CASES[case]))
            run_train(config)
            runs[case] = (config, run)
        return runs[case]
    return get


def _tensors(obj, path: str, out: list) -> None:
    """Every tensor in a loaded checkpoint file, with its key path (DeepSpeed's dataclasses included)."""
    if torch.is_tensor(obj):
        out.append((path, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{path}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{path}[{i}]", out)


def _model_counts(config: Path) -> tuple[int, int, int, set[str]]:
    """(trainable elements, the same with tied aliases counted again, frozen elements, frozen names with
    aliases) of the config's model, built on the meta device (nothing loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from blip_train.config import load_config
    from blip_train.models.llm_bridge import Blip2LLM
    from blip_train.models.stage1 import Blip2Stage1

    cfg = load_config(str(config))
    with torch.device("meta"):
        if cfg.model.arch == "stage1":
            model = Blip2Stage1(cfg.model, device_type="cpu")
        else:
            llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.llm.path))
            model = Blip2LLM(cfg.model, llm, device_type="cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with_aliases = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen_names = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return trainable, with_aliases, frozen, frozen_names


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_holds_trainable_state_and_optimizer_only(case, full_runs):
    """Bytes of every tensor DeepSpeed wrote = fp32 master + Adam's two moments (12 bytes per trainable
    element, partitions padded by a few elements) + under ZeRO-2 the 16-bit module copy of the trainable
    parameters. No frozen tensor in any file; complete.json says what was left out and where it comes from."""
    config, run = full_runs(case)
    arch, zero = CASES[case]
    tag_dir = run / "checkpoints" / "step_0000002"
    trainable, with_aliases, frozen, frozen_names = _model_counts(config)
    tensors: list[tuple[str, torch.Tensor]] = []
    for f in sorted(tag_dir.glob("*.pt")):
        if not f.name.startswith("rank_"):  # ours: RNG streams and the data position
            _tensors(torch.load(f, map_location="cpu", weights_only=False), f.name, tensors)
    stored = sum(t.numel() * t.element_size() for _, t in tensors)
    expected = 12 * trainable + (2 * with_aliases if zero == 2 else 0)
    assert 2 * frozen > 0.03 * expected  # a bf16 copy of the frozen towers could not hide in the tolerance
    assert abs(stored - expected) <= 0.01 * expected, (stored, expected, 2 * frozen)
    leaked = [p for p, t in tensors if t.numel() and p.rsplit("/", 1)[-1] in frozen_names]
    assert not leaked, leaked[:5]
    assert not any("frozen_param" in p for p, _ in tensors)

    meta = json.loads((tag_dir / "complete.json").read_text())
    assert set(meta["frozen"]) == ({"visual_encoder"} | ({"llm"} if arch == "stage2" else set()))
    assert all(r["dtype"] == "bfloat16" for r in meta["frozen"].values())
    assert sum(r["numel"] for r in meta["frozen"].values()) == frozen
    assert meta["frozen_sources"]["vision"].endswith("vit.safetensors")
    if arch == "stage2":
        assert meta["frozen_sources"]["llm"].endswith("llm_opt")


@pytest.mark.parametrize("case", ["stage1-zero2", "stage2_opt-zero3"])
def test_resume_is_exact_and_frozen_towers_come_from_their_source(case, full_runs, tmp_path):
    """Resumed from step 2 (2 ranks, as saved): steps 3-4 redo the uninterrupted run's losses and weights;
    the live frozen towers (not in the checkpoint) equal their sources bit for bit."""
    config, full = full_runs(case)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002")
    resumed_config = config_with_output_dir(config, resumed)
    r = train_and_dump(resumed_config, tmp_path / "live.pt")
    assert "resumed from" in r.stdout and "at step 2" in r.stdout and "trained against frozen towers" not in r.stdout
    a, b = read_losses(full), read_losses(resumed)
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in (3, 4)), (a, b)
    wa, wb = trainable_weights(full, "step_0000004"), trainable_weights(resumed, "step_0000004")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert_frozen_is_source(torch.load(tmp_path / "live.pt", weights_only=True), config)


def test_elastic_resume_two_ranks_to_one_restores_the_trained_state(full_runs, tmp_path):
    """2 → 1 rank through the universal checkpoint: the 1-rank engine holds exactly the trained weights of
    the 2-rank step-4 checkpoint (its bf16 working copies of the fp32 masters), and the frozen ViT, which
    the universal format does not carry, is its source."""
    config, full = full_runs("stage1-zero3")
    run = tmp_path / "elastic"
    shutil.copytree(full / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000004")
    (run / "checkpoints" / "latest").write_text("step_0000004")
    r = train_and_dump(config_with_output_dir(config, run), tmp_path / "live.pt", nproc=1)
    assert "converting to a universal checkpoint" in r.stdout and "at step 4" in r.stdout
    dump = torch.load(tmp_path / "live.pt", weights_only=True)
    masters = trainable_weights(full, "step_0000004")
    assert len(dump["trainable"]) > 50 and dump["trainable"].keys() <= masters.keys()
    for k, v in dump["trainable"].items():
        assert torch.equal(v, masters[k].to(v.dtype)), k
    assert_frozen_is_source(dump, config)


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(2))


def test_module_load_states_which_keys_may_be_missing():
    from blip_train.training.checkpoint import load_module_without_frozen_

    model = _Tower()
    saved = {k: v.clone() + 1 for k, v in model.state_dict().items() if not k.startswith("frozen.")}
    before = model.frozen.weight.clone()
    load_module_without_frozen_(saved, model)  # only the frozen tower is missing: fine, it stays as built
    assert torch.equal(model.frozen.weight, before) and torch.equal(model.head.weight, saved["head.weight"])
    for drop in ("head.bias", "scale"):  # a trainable parameter or a buffer missing is an error
        with pytest.raises(RuntimeError, match=f"missing trainable/buffer keys \\['{drop}'\\]"):
            load_module_without_frozen_({k: v for k, v in saved.items() if k != drop}, _Tower())
    with pytest.raises(RuntimeError, match="unexpected keys \\['other'\\]"):
        load_module_without_frozen_(dict(saved, other=torch.zeros(1)), _Tower())
