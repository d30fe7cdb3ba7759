"""export_hf on stage 2 / InstructBLIP weights (OPT, LLaMA, T5): transformers loads the folder with no
missing or unexpected keys, its logits equal ours on the same batch (fp32, <= 1e-5), the saved processor
and generation config drive `generate` to our greedy tokens; a transformers-native folder survives
import_hf -> export_hf bit for bit, and model.init_from loads the import.

Assets are real folders written here: tiny random LLMs with tokenizers trained on the fly (vocabulary
exactly the tokenizer's, as the demo's, so `<image>` needs a new embedding row), a ViT safetensors file,
a Q-Former tokenizer. Our models are built by the real stage builders and loaded from those folders.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blip_train.config import config_from_dict, config_to_dict
from blip_train.interop.hf_export import export_hf
from blip_train.interop.weights_io import write_weights
from tests.helpers.tiny import tiny_model_config, tiny_vision_config

pytestmark = pytest.mark.parity
ATOL = 1e-5
TEXTS = ["a red square on a blue field", "two green circles", "a small yellow triangle left of a circle",
         "what color is the square", "how many circles are there", "describe the image briefly",
         "a large purple shape near the top", "the triangle is below the square"] * 3


def _llm_config(kind: str, tok):
    from transformers import LlamaConfig, OPTConfig, T5Config

    v = len(tok)  # no spare rows: `<image>` gets a new one at export
    if kind == "opt":
        return OPTConfig(vocab_size=v, hidden_size=24, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                         max_position_embeddings=96, word_embed_proj_dim=24, dropout=0.0, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "llama":
        return LlamaConfig(vocab_size=v, hidden_size=24, num_hidden_layers=2, intermediate_size=48,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return T5Config(vocab_size=v, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id)


def make_export_assets(root: Path) -> dict[str, Path]:
    """LLM folders (opt, llama, t5) with tokenizers, a ViT file and a Q-Former tokenizer under `root`."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from blip_train.data.tokenizers import train_bpe_tokenizer, train_wordpiece_tokenizer
    from blip_train.models.eva_vit import EVAViT

    assets = {"qformer_tokenizer": root / "qformer_tokenizer", "vit": root / "vit.safetensors"}
    train_wordpiece_tokenizer(TEXTS, vocab_size=100, out_dir=assets["qformer_tokenizer"])
    torch.manual_seed(0)
    vit = EVAViT(tiny_vision_config())
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(assets["vit"]))
    for i, kind in enumerate(("opt", "llama", "t5")):
        folder = root / f"llm_{kind}"
        tok = train_bpe_tokenizer(TEXTS, vocab_size=90, out_dir=folder, style=kind)
        torch.manual_seed(1 + i)
        cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
        cls.from_config(_llm_config(kind, tok)).save_pretrained(str(folder))
        assets[kind] = folder
    return assets


def experiment(arch: str, assets: dict, kind: str | None = None, **model_overrides) -> dict:
    """A resolved-config dict for our tiny model of `arch` over the assets (fp32 towers)."""
    m = tiny_model_config(arch=arch)
    m = replace(m, vision=replace(m.vision, weights=str(assets["vit"]), precision="fp32"),
                qformer=replace(m.qformer, tokenizer=str(assets["qformer_tokenizer"])),
                llm=replace(m.llm, path=str(assets[kind]) if kind else "", dtype="fp32"), **model_overrides)
    cfg = config_from_dict({})
    cfg = replace(cfg, model=m, eval=replace(cfg.eval, num_beams=1, max_new_tokens=8))
    return config_to_dict(cfg)


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Make every trainable tensor distinct (a swapped name cannot go unnoticed), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_ours(cfg_dict: dict, seed: int = 3):
    """Our model through the real builders (frozen towers from their folders), trained parts perturbed."""
    from blip_train.training.stages import build_llm_stage_model, build_stage1_model

    cfg = config_from_dict(cfg_dict)
    if cfg.model.arch == "stage1":
        model, _ = build_stage1_model(cfg, device_type="cpu")
    else:
        model, _, _ = build_llm_stage_model(cfg, device_type="cpu")
    perturb_(model, seed)
    return model.eval()


def save_trained(model: torch.nn.Module, cfg_dict: dict, out: Path) -> Path:
    """The trained parameters as a weights folder carrying the config (what zero_to_safetensors writes)."""
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    write_weights(trained, out, {"arch": cfg_dict["model"]["arch"], "contents": "trainable", "config": cfg_dict})
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return make_export_assets(tmp_path_factory.mktemp("export_assets"))


def load_hf(folder: Path):
    """transformers' own loading path; every key must be accounted for."""
    from transformers import AutoConfig, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
    from transformers import InstructBlipForConditionalGeneration

    classes = {c.__name__: c for c in (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                                       InstructBlipForConditionalGeneration)}
    arch = AutoConfig.from_pretrained(folder).architectures[0]
    model, info = classes[arch].from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    return model.eval()


def picture(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


CASES = [("stage2", "opt"), ("stage2", "t5"), ("instruct", "llama"), ("instruct", "t5")]


def assert_export_matches_ours(out: Path, ours, arch: str, adapter: Path | None = None) -> None:
    """transformers loads `out` cleanly (and the peft `adapter` folder into its LLM, when given); on the saved
    processor's inputs its logits equal ours (over our vocabulary) and greedy decoding gives our tokens; the
    saved generation defaults run as they are."""
    from transformers import AutoProcessor

    hf = load_hf(out)
    if adapter is not None:
        hf.language_model.load_adapter(str(adapter))
        hf.eval()
    processor = AutoProcessor.from_pretrained(str(out))
    prompt = "what color is the square" if arch == "instruct" else "a photo of"
    inputs = processor(images=[picture(0), picture(1)], text=[prompt, prompt], return_tensors="pt")
    nq, vocab = ours.query_tokens.shape[1], ours.llm.config.vocab_size
    ids = inputs["input_ids"]
    assert (ids[:, :nq] == hf.config.image_token_index).all()
    text_ids, text_mask = ids[:, nq:], inputs["attention_mask"][:, nq:]
    qf = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in inputs}

    with torch.no_grad():
        soft = ours.soft_prompt(inputs["pixel_values"], qf.get("qformer_input_ids"), qf.get("qformer_attention_mask"))
        embeds, mask = ours.llm_inputs(soft, text_ids, text_mask)
        extra = {}
        if not ours.decoder_only:
            extra["decoder_input_ids"] = torch.tensor([[ours.llm.config.decoder_start_token_id, 5, 9, 4]] * 2)
        want = ours.llm(inputs_embeds=embeds, attention_mask=mask, **extra).logits
        got = hf(**inputs, **extra).logits
    assert got.shape[-1] == vocab + 1 and got.shape[:-1] == want.shape[:-1]  # + the `<image>` row
    assert (got[..., :vocab] - want).abs().max() <= ATOL

    # Greedy decoding from the saved processor + generation config equals ours on the same inputs.
    gen = hf.generation_config
    kw = dict(num_beams=1, max_new_tokens=6, min_new_tokens=1, repetition_penalty=1.0, do_sample=False)
    with torch.no_grad():
        theirs = hf.generate(**inputs, **kw)
        mine = ours.generate(inputs["pixel_values"], text_ids, text_mask, qf.get("qformer_input_ids"),
                             qf.get("qformer_attention_mask"), eos_token_id=gen.eos_token_id, **kw)
    if ours.decoder_only:
        theirs = theirs[:, ids.shape[1]:]  # transformers returns the prompt first
    assert torch.equal(theirs, mine), (theirs, mine)
    assert gen.suppress_tokens == [hf.config.image_token_index]
    # generate() decodes with the language model's generation config (built from text_config on loading)
    saved = {k: v for k, v in gen.to_diff_dict().items() if k != "transformers_version"}
    assert {k: getattr(hf.language_model.generation_config, k) for k in saved} == saved
    with torch.no_grad():  # the saved defaults (beams, InstructBLIP's penalty) run as they are
        text = processor.batch_decode(hf.generate(**inputs, max_new_tokens=4), skip_special_tokens=True)
    assert len(text) == 2 and all(isinstance(t, str) for t in text)


@pytest.mark.parametrize("arch,kind", CASES)
def test_export_loads_and_matches_our_logits_and_generation(arch, kind, assets, tmp_path):
    cfg = experiment(arch, assets, kind)
    ours = build_ours(cfg)
    summary = export_hf(save_trained(ours, cfg, tmp_path / "weights"), tmp_path / "hf")
    assert summary["left_out"] == [] and summary["vocab_padded"]  # the tokenizer had no room for <image>
    assert_export_matches_ours(tmp_path / "hf", ours, arch)


def test_stage2_opt_generation_config_stops_at_newline(assets, tmp_path):
    cfg = experiment("stage2", assets, "opt")
    export_hf(save_trained(build_ours(cfg), cfg, tmp_path / "w"), tmp_path / "hf")
    from transformers import AutoTokenizer, GenerationConfig

    gen = GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert set(gen.eos_token_id) == {tok.eos_token_id, *newline} and gen.num_beams == 1
