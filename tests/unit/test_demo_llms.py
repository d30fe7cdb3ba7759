"""The demo's tiny LLM assets: trained from the train split, saved as HF folders that the stages load."""
from __future__ import annotations

import torch

from blip_train.config.schema import LLMConfig
from blip_train.data.llm_collate import load_llm_tokenizer
from blip_train.data.synthetic import write_synthetic_dataset
from blip_train.demo.llms import _content_words, build_demo_llms, read_demo_texts
from blip_train.models.llm_bridge import load_llm


def test_demo_llms_are_loadable_hf_folders(tmp_path):
    write_synthetic_dataset(tmp_path / "data", num_samples=24, val_fraction=0.2, image_size=32)
    texts = read_demo_texts(str(tmp_path / "data" / "train"))
    assert len(texts.captions) >= 19 and len(texts.instructions) == 3 * 19
    assert _content_words("a red circle on the left") == "red circle left"
    info = build_demo_llms(str(tmp_path / "data" / "train"), tmp_path / "assets", steps=2, log=lambda m: None)
    assert set(info) == {"opt", "llama", "t5"} and all(v["final_loss"] > 0 for v in info.values())
    for kind in ("opt", "llama", "t5"):
        llm = load_llm(LLMConfig(path=str(tmp_path / "assets" / kind), dtype="fp32"), "cpu")
        tok = load_llm_tokenizer(tmp_path / "assets" / kind)
        assert llm.config.vocab_size == len(tok) and llm.config.is_encoder_decoder == (kind == "t5")
        assert not any(p.requires_grad for p in llm.parameters())
        ids = tok("a red circle", return_tensors="pt").input_ids
        out = llm.generate(ids, max_new_tokens=3) if kind != "t5" else llm.generate(input_ids=ids, max_new_tokens=3)
        assert out.shape[0] == 1 and torch.is_tensor(out)
    again = build_demo_llms(str(tmp_path / "data" / "train"), tmp_path / "assets", steps=2, log=lambda m: None)
    assert again == {}  # existing folders are reused
