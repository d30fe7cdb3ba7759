"""Our weights on disk (single file / sharded folder with HF's index), init_from loading rules, checkpoint
location errors, and the four tools' CLI conventions (--help, --overwrite, one-line failures)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from blip_train.interop.consolidate import locate_checkpoint
from blip_train.interop.weights_io import (INDEX_FILE, META_FILE, SINGLE_FILE, InteropError, parse_size, plan_shards,
                                           read_weights, write_weights)
from blip_train.models.hf_names import read_hf_folder_weights
from blip_train.training.weights import STAGE1_INIT_OPTIONAL, init_stage1_from_, read_init_weights
from tests.unit.test_tools_convert import run as run_cli

TOOLS = ("zero_to_safetensors.py", "export_hf.py", "import_hf.py", "import_lavis.py")


def tensors(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(16, 8, generator=g) for i in range(n)} | {"step": torch.tensor([7])}


class Lazy:
    """Stands in for DeepSpeed's lazily gathered ZeRO-3 tensors (shape, dtype, contiguous())."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape, self.dtype, self.calls = t, t.shape, t.dtype, 0

    def contiguous(self) -> torch.Tensor:
        self.calls += 1
        return self.t


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2KiB") == 2048 and parse_size("1.5MB") == 1_500_000
    assert parse_size(123) == 123 and parse_size("99") == 99
    for bad in ("5XB", "GB", "-1MB", "0"):
        with pytest.raises(InteropError):
            parse_size(bad)


def test_single_file_round_trip_with_metadata_and_dtype(tmp_path):
    sd = tensors()
    write_weights(sd, tmp_path / "w.safetensors", {"arch": "stage1", "config": {"model": {"arch": "stage1"}}})
    back, meta = read_weights(tmp_path / "w.safetensors")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert meta["format"] == "blip_train.weights" and meta["config"]["model"]["arch"] == "stage1"
    write_weights(sd, tmp_path / "h.safetensors", {}, dtype=torch.bfloat16)
    half, meta = read_weights(tmp_path / "h.safetensors")
    assert half["layer0.weight"].dtype == torch.bfloat16 and half["step"].dtype == torch.int64
    assert meta["dtype"] == "bf16"


def test_sharded_folder_uses_hf_index_and_materialises_lazily(tmp_path):
    sd = tensors()
    lazy = {k: Lazy(v) for k, v in sd.items()}
    per = 16 * 8 * 4
    assert plan_shards(lazy, 2 * per) == [["layer0.weight", "layer1.weight"], ["layer2.weight", "layer3.weight"],
                                          ["layer4.weight", "layer5.weight"], ["step"]]
    files = write_weights(lazy, tmp_path / "w", {"arch": "stage2"}, max_shard_size=2 * per)
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert all(t.calls == 1 for t in lazy.values())  # each tensor gathered exactly once
    index = json.loads((tmp_path / "w" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 6 * per + 8 and index["weight_map"]["step"] == files[-1].name
    for back in (read_weights(tmp_path / "w")[0], read_hf_folder_weights(tmp_path / "w")):  # transformers' reader too
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert json.loads((tmp_path / "w" / META_FILE).read_text())["arch"] == "stage2"
    # Small enough for one shard: a plain model.safetensors.
    write_weights(sd, tmp_path / "one", {})
    assert (tmp_path / "one" / SINGLE_FILE).is_file() and not (tmp_path / "one" / INDEX_FILE).exists()


def test_outputs_are_never_replaced_silently_nor_left_half_written(tmp_path):
    write_weights(tensors(), tmp_path / "w", {"v": 1})
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_weights(tensors(), tmp_path / "w", {"v": 2})
    write_weights(tensors(2), tmp_path / "w", {"v": 3}, overwrite=True)
    back, meta = read_weights(tmp_path / "w")
    assert meta["v"] == 3 and len(back) == 3

    class Exploding(Lazy):
        def contiguous(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_weights({"a": Exploding(torch.zeros(2))}, tmp_path / "bad", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no partial output, no temp folder


def test_unreadable_inputs_name_the_file_in_one_line(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "junk.pth").write_text("hello")
    for path, fragment in ((tmp_path / "junk.safetensors", "not a readable safetensors"),
                           (tmp_path / "junk.pth", "not a readable torch state dict"),
                           (tmp_path / "absent.safetensors", "no such file")):
        with pytest.raises(InteropError, match=fragment) as e:
            read_weights(path)
        assert "\n" not in str(e.value) and str(path.name) in str(e.value)
    with pytest.raises(InteropError, match="not a checkpoint"):
        locate_checkpoint(tmp_path)
    with pytest.raises(InteropError, match="no such file"):
        locate_checkpoint(tmp_path / "nope")
    with pytest.raises(InteropError, match="no checkpoint tag step_0000005"):
        locate_checkpoint(tmp_path, "step_0000005")


def stage1_model():
    from blip_train.models.stage1 import Blip2Stage1
    from tests.helpers.tiny import tiny_model_config

    torch.manual_seed(0)
    return Blip2Stage1(tiny_model_config(), device_type="cpu")


def test_stage1_init_from_a_weights_folder(tmp_path):
    src, dst = stage1_model(), stage1_model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    trained = {n: p.detach() for n, p in src.named_parameters() if p.requires_grad}
    # As a transformers retrieval import: no temperature, no Q-Former LM head; the frozen ViT is ignored.
    partial = {k: v for k, v in trained.items() if not k.startswith(STAGE1_INIT_OPTIONAL)}
    partial["visual_encoder.cls_token"] = torch.zeros(1, 1, 32)
    write_weights(partial, tmp_path / "w", {"arch": "stage1"})
    assert read_init_weights(tmp_path / "w").keys() == partial.keys()
    kept = init_stage1_from_(dst, tmp_path / "w")
    assert kept == sorted(k for k in trained if k.startswith(STAGE1_INIT_OPTIONAL)) and "temp" in kept
    params = dict(dst.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in partial.items() if k in params and params[k].requires_grad)
    assert params["temp"].item() == pytest.approx(0.07)

    save_file({k: v for k, v in partial.items() if not k.startswith("ln_vision.")}, str(tmp_path / "x.safetensors"))
    with pytest.raises(KeyError, match="ln_vision.bias"):
        init_stage1_from_(dst, tmp_path / "x.safetensors")
    save_file(dict(partial, **{"llm_proj.weight": torch.zeros(2, 2)}), str(tmp_path / "y.safetensors"))
    with pytest.raises(KeyError, match="llm_proj.weight"):
        init_stage1_from_(dst, tmp_path / "y.safetensors")
    save_file(dict(partial, query_tokens=torch.zeros(1, 5, 32)), str(tmp_path / "z.safetensors"))
    with pytest.raises(ValueError, match=r"query_tokens has shape \(1, 5, 32\)"):
        init_stage1_from_(dst, tmp_path / "z.safetensors")


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_help_and_one_line_failures(tool, tmp_path, capsys):
    code, out, _ = run_cli(tool, "--help", capsys=capsys)
    assert code == 0 and "--out" in out and "--overwrite" in out
    args = {"zero_to_safetensors.py": ["--checkpoint", str(tmp_path)],
            "export_hf.py": ["--checkpoint", str(tmp_path)],
            "import_hf.py": ["--hf", str(tmp_path)],
            "import_lavis.py": ["--checkpoint", str(tmp_path / "absent.pth")]}[tool]
    code, _, err = run_cli(tool, *args, "--out", str(tmp_path / "o"), capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path) in lines[0], err
