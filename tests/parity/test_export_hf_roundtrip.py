"""import_hf -> export_hf reproduces a transformers-native folder bit for bit (retrieval, BLIP-2 OPT,
InstructBLIP LLaMA / T5), and the import is what training starts from: the config snippet it writes
plus model.init_from rebuild exactly the imported weights through the real stage builders.

The native folders are built here from transformers' own config classes and random weights (k bias
zero, as EVA's), with the processor transformers itself saves (it adds `<image>` to the tokenizer).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from blip_train.config import config_from_dict
from blip_train.interop.hf_export import export_hf
from blip_train.interop.hf_import import import_hf
from blip_train.interop.weights_io import InteropError, read_weights
from blip_train.models.hf_names import read_hf_folder_weights
from tests.helpers.tiny import (hf_blip2_config, hf_instructblip_qformer_config, hf_vision_config,
                                tiny_qformer_config, tiny_vision_config)
from tests.parity.test_export_hf_models import _llm_config, assets  # noqa: F401  (module fixture)
from tests.parity.test_parity_hf import randomize_

pytestmark = pytest.mark.parity


def native_folder(arch: str, kind: str | None, assets: dict, out: Path) -> Path:  # noqa: F811
    """A transformers BLIP-2 / InstructBLIP folder as transformers writes one (weights, processor)."""
    from transformers import (AutoTokenizer, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                              Blip2Processor, BlipImageProcessor, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor)

    vcfg, qcfg = tiny_vision_config(), tiny_qformer_config()
    qtok = AutoTokenizer.from_pretrained(str(assets["qformer_tokenizer"]))
    images = BlipImageProcessor(size={"height": vcfg.image_size, "width": vcfg.image_size})
    torch.manual_seed(0)
    if arch == "stage1":
        config = hf_blip2_config(vcfg, qcfg)
        config.image_text_hidden_size = 16
        model, processor = Blip2ForImageTextRetrieval(config), Blip2Processor(images, qtok)
    else:
        tok = AutoTokenizer.from_pretrained(str(assets[kind]))
        text = _llm_config(kind, tok)
        text.vocab_size = len(tok) + 1  # room for the `<image>` token the processor adds next
        if arch == "stage2":
            config = hf_blip2_config(vcfg, qcfg, text)
            config.qformer_config.use_qformer_text_input = False
            processor = Blip2Processor(images, tok, num_query_tokens=qcfg.num_query_tokens)
            cls = Blip2ForConditionalGeneration
        else:
            config = InstructBlipConfig(vision_config=hf_vision_config(vcfg).to_dict(),
                                        qformer_config=hf_instructblip_qformer_config(qcfg, vcfg.width).to_dict(),
                                        text_config=text.to_dict(), num_query_tokens=qcfg.num_query_tokens)
            processor = InstructBlipProcessor(images, tok, qtok, num_query_tokens=qcfg.num_query_tokens)
            cls = InstructBlipForConditionalGeneration
        config.image_token_index = tok.convert_tokens_to_ids("<image>")
        assert config.image_token_index == len(tok) - 1
        model = cls(config)
    randomize_(model, seed=5, zero_k_bias=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


CASES = [("stage1", None), ("stage2", "opt"), ("instruct", "llama"), ("instruct", "t5")]


@pytest.mark.parametrize("arch,kind", CASES)
def test_import_then_export_is_bit_identical(arch, kind, assets, tmp_path):  # noqa: F811
    from transformers import AutoConfig, GenerationConfig

    native = native_folder(arch, kind, assets, tmp_path / "native")
    summary = import_hf(native, tmp_path / "ours")
    assert summary["arch"] == arch and summary["notes"] == []
    export_hf(tmp_path / "ours", tmp_path / "back")
    a, b = read_hf_folder_weights(native), read_hf_folder_weights(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = AutoConfig.from_pretrained(native), AutoConfig.from_pretrained(tmp_path / "back")
    assert ca.architectures == cb.architectures and ca.num_query_tokens == cb.num_query_tokens
    assert getattr(ca, "image_token_index", None) == getattr(cb, "image_token_index", None)
    for part in ("vision_config", "qformer_config") + (("text_config",) if arch != "stage1" else ()):
        da, db = getattr(ca, part).to_diff_dict(), getattr(cb, part).to_diff_dict()
        if part == "text_config" and isinstance(db.get("eos_token_id"), list):
            # the export's decoding defaults live in text_config too (generate() reads them there):
            # OPT stage 2 also stops at "\n", as in transformers' own BLIP-2 OPT configs
            assert db["eos_token_id"] == GenerationConfig.from_pretrained(tmp_path / "back").eos_token_id
            db["eos_token_id"] = db["eos_token_id"][0]
        keys = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "d_model", "num_layers", "eos_token_id", "bos_token_id", "pad_token_id", "encoder_hidden_size"}
        assert {k: v for k, v in da.items() if k in keys} == {k: v for k, v in db.items() if k in keys}, part


@pytest.mark.parametrize("arch,kind", [("stage1", None), ("instruct", "t5")])
def test_init_from_the_import_rebuilds_its_weights(arch, kind, assets, tmp_path):  # noqa: F811
    from blip_train.training.stages import build_llm_stage_model, build_stage1_model
    from blip_train.training.weights import STAGE1_INIT_OPTIONAL, init_stage1_from_

    native = native_folder(arch, kind, assets, tmp_path / "native")
    import_hf(native, tmp_path / "ours")
    snippet = yaml.safe_load((tmp_path / "ours" / "config_snippet.yaml").read_text())
    snippet["model"]["vision"]["precision"] = "fp32"
    if arch != "stage1":
        snippet["model"]["llm"]["dtype"] = "fp32"
    cfg = config_from_dict(snippet)
    trained, meta = read_weights(tmp_path / "ours")
    assert meta["arch"] == arch and cfg.model.init_from == str((tmp_path / "ours").resolve())
    if arch == "stage1":
        model, _ = build_stage1_model(replace(cfg, model=replace(cfg.model, init_from="")), device_type="cpu")
        kept = init_stage1_from_(model, cfg.model.init_from)
        assert kept and all(k.startswith(STAGE1_INIT_OPTIONAL) for k in kept)
    else:
        model, _, report = build_llm_stage_model(cfg, device_type="cpu")
        assert report["missing"] == [] and report["unused"] == []
    state = model.state_dict()
    for k, v in trained.items():
        assert torch.equal(state[k], v), k
    # Frozen towers come from the files the snippet names: equal to the native model's.
    native_sd = read_hf_folder_weights(native)
    assert torch.equal(state["visual_encoder.blocks.0.attn.qkv.weight"],
                       native_sd["vision_model.encoder.layers.0.self_attn.qkv.weight"])
    if arch != "stage1":
        assert torch.equal(state["llm.shared.weight"], native_sd["language_model.shared.weight"])


def test_import_refuses_bad_folders(assets, tmp_path):  # noqa: F811
    with pytest.raises(InteropError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "x")
    native = native_folder("stage2", "opt", assets, tmp_path / "native")
    import_hf(native, tmp_path / "ours")
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_hf(native, tmp_path / "ours")
    sd = read_hf_folder_weights(native)
    sd["query_tokens"] = torch.zeros(1, 3, 32)  # a shape the config does not imply
    from safetensors.torch import save_file
    save_file(sd, str(native / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"query_tokens has shape \(1, 3, 32\)") as e:
        import_hf(native, tmp_path / "ours2")
    assert "\n" not in str(e.value)
