"""An exported InstructBLIP (FlanT5-style LLM) decodes with its saved defaults when asked plainly.

`InstructBlipForConditionalGeneration.generate` runs `language_model.generate`, which decodes with the
language model's own generation config: transformers builds it on loading from `text_config`, never
from generation_config.json (that one reaches the outer model only). An export that saved its
decoding defaults in generation_config.json alone decoded with transformers' bare defaults: no
min_new_tokens, no beams, no repetition penalty, `<image>` not suppressed. The demo's instruction-tuned
T5 puts </s> first for an unseen question, so ours answered "triangle" and the export "".

The tiny T5 here is made to do the same (</s> first at every step), so the plain `generate(**inputs)`
of the export must keep min_new_tokens=1 to give our tokens.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from blip_train.interop.hf_export import export_hf
from tests.helpers.tiny import tiny_vision_config
from tests.parity.test_export_hf_models import (TEXTS, _llm_config, build_ours, experiment, load_hf, picture,
                                                save_trained)

pytestmark = pytest.mark.parity


def favour_eos_(llm, eos: int) -> None:
    """Make </s> the decoder's first choice whatever the input: residual dimension 0 is +1 for every
    token and nothing writes into it, so the final RMSNorm gives it a positive value, which the </s>
    row of the LM head (alone reading it) turns into a large logit."""
    with torch.no_grad():
        llm.shared.weight[:, 0] = 1.0
        for block in llm.decoder.block:
            for layer in block.layer:
                out = (layer.SelfAttention.o if hasattr(layer, "SelfAttention") else
                       layer.EncDecAttention.o if hasattr(layer, "EncDecAttention") else layer.DenseReluDense.wo)
                out.weight[0] = 0.0
        llm.decoder.final_layer_norm.weight[0] = 1.0
        llm.lm_head.weight[:, 0] = 0.0
        llm.lm_head.weight[eos, 0] = 100.0


@pytest.fixture(scope="module")
def t5_assets(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoModelForSeq2SeqLM

    from blip_train.data.tokenizers import train_bpe_tokenizer, train_wordpiece_tokenizer
    from blip_train.models.eva_vit import EVAViT

    root = tmp_path_factory.mktemp("instruct_t5_assets")
    assets = {"qformer_tokenizer": root / "qformer_tokenizer", "vit": root / "vit.safetensors", "t5": root / "t5"}
    train_wordpiece_tokenizer(TEXTS, vocab_size=100, out_dir=assets["qformer_tokenizer"])
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in EVAViT(tiny_vision_config()).state_dict().items()}, str(assets["vit"]))
    tok = train_bpe_tokenizer(TEXTS, vocab_size=90, out_dir=assets["t5"], style="t5")
    torch.manual_seed(3)
    llm = AutoModelForSeq2SeqLM.from_config(_llm_config("t5", tok))
    favour_eos_(llm, tok.eos_token_id)
    llm.save_pretrained(str(assets["t5"]))
    return assets


def test_plain_generate_uses_the_saved_decoding_defaults(t5_assets, tmp_path):
    from transformers import AutoProcessor, GenerationConfig

    cfg = experiment("instruct", t5_assets, "t5")
    ours = build_ours(cfg)
    out = tmp_path / "hf"
    export_hf(save_trained(ours, cfg, tmp_path / "weights"), out)
    hf, processor = load_hf(out), AutoProcessor.from_pretrained(str(out))

    # What transformers decodes with is what the folder saved.
    saved = GenerationConfig.from_pretrained(str(out)).to_diff_dict()
    saved.pop("transformers_version", None)
    assert saved["min_new_tokens"] == 1 and saved["suppress_tokens"] == [hf.config.image_token_index]
    used = hf.language_model.generation_config
    assert {k: getattr(used, k) for k in saved} == saved

    inputs = processor(images=[picture(0), picture(1)], text=["what color is the square"] * 2, return_tensors="pt")
    nq, eos, start = ours.query_tokens.shape[1], ours.llm.config.eos_token_id, ours.llm.config.decoder_start_token_id
    text_ids, text_mask = inputs["input_ids"][:, nq:], inputs["attention_mask"][:, nq:]
    with torch.no_grad():  # the condition of the demo: </s> is the first choice (of both models)
        first = hf(**inputs, decoder_input_ids=torch.full((2, 1), start)).logits[:, -1]
        assert (first.argmax(-1) == eos).all()
        for kw in ({"num_beams": 1}, {}):  # greedy (our evaluation's), then the saved defaults as they are
            theirs = hf.generate(**inputs, max_new_tokens=5, **kw)
            mine = ours.generate(inputs["pixel_values"], text_ids, text_mask, inputs["qformer_input_ids"],
                                 inputs["qformer_attention_mask"], max_new_tokens=5, eos_token_id=eos,
                                 num_beams=kw.get("num_beams", saved["num_beams"]))
            assert torch.equal(theirs, mine), (kw, theirs, mine)
            assert (theirs[:, 1] != eos).all()  # min_new_tokens=1: never an empty answer
