"""Loss parity of our LLM bridge with transformers' Blip2ForConditionalGeneration and
InstructBlipForConditionalGeneration (fp32, same weights through hf_names, same batch, <= 1e-5).

transformers expects the query positions as image placeholder tokens inside input_ids (and their
labels as -100); ours prepends the projected queries to the embedded text. For T5 both see the same
fixed encoder text and decoder targets (the collator's random split is tested elsewhere).
"""
from __future__ import annotations

import pytest
import torch

from blip_train.models.hf_names import model_from_hf
from blip_train.models.llm_bridge import Blip2LLM
from tests.helpers.tiny import hf_blip2_config, hf_instructblip_qformer_config, hf_vision_config
from tests.parity.test_parity_hf import randomize_
from tests.unit.test_llm_bridge import V, bridge_config, make_batch, tiny_llm_config

pytestmark = pytest.mark.parity
IMG = V - 1  # image placeholder id (random text ids stay below it)
ATOL = 1e-5


def build_pair(arch: str, kind: str):
    """(transformers model, our Blip2LLM) with identical randomised weights, both in eval mode."""
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, Blip2ForConditionalGeneration,
                              InstructBlipConfig, InstructBlipForConditionalGeneration)

    cfg = bridge_config(arch)
    text_cfg = tiny_llm_config(kind)
    torch.manual_seed(0)
    if arch == "stage2":
        hf_cfg = hf_blip2_config(cfg.vision, cfg.qformer, text_cfg)
        hf_cfg.qformer_config.use_qformer_text_input = False  # as the released stage-2 checkpoints
        hf_cfg.image_token_index = IMG
        hf, layout = Blip2ForConditionalGeneration(hf_cfg), "blip2_generation"
    else:
        qformer_cfg = hf_instructblip_qformer_config(cfg.qformer, cfg.vision.width)
        hf_cfg = InstructBlipConfig(vision_config=hf_vision_config(cfg.vision).to_dict(),
                                    qformer_config=qformer_cfg.to_dict(), text_config=text_cfg.to_dict(),
                                    num_query_tokens=cfg.qformer.num_query_tokens, image_token_index=IMG)
        hf, layout = InstructBlipForConditionalGeneration(hf_cfg), "instructblip_generation"
    randomize_(hf, seed=11, zero_k_bias=True)  # EVA has no k bias; every other weight distinct
    llm_cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    ours = Blip2LLM(cfg, llm_cls.from_config(text_cfg), device_type="cpu")
    result = ours.load_state_dict(model_from_hf(hf.state_dict(), layout), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf.eval(), ours.eval(), cfg


def hf_inputs(batch: dict, nq: int, decoder_only: bool) -> dict:
    """The same batch in transformers' form: nq image placeholders before the LLM text."""
    b = batch["llm_input_ids"].shape[0]
    ids = torch.cat([torch.full((b, nq), IMG), batch["llm_input_ids"]], dim=1)
    mask = torch.cat([torch.ones(b, nq, dtype=torch.long), batch["llm_attention_mask"]], dim=1)
    labels = batch["llm_labels"]
    if decoder_only:
        labels = torch.cat([torch.full((b, nq), -100), labels], dim=1)
    out = {"pixel_values": batch["pixel_values"], "input_ids": ids, "attention_mask": mask, "labels": labels}
    if "qformer_input_ids" in batch:
        out.update(qformer_input_ids=batch["qformer_input_ids"], qformer_attention_mask=batch["qformer_attention_mask"])
    return out


CASES = [("stage2", "opt"), ("stage2", "t5"), ("instruct", "opt"), ("instruct", "llama"), ("instruct", "t5")]


@pytest.mark.parametrize("arch,kind", CASES)
def test_loss_matches_transformers(arch, kind):
    hf, ours, cfg = build_pair(arch, kind)
    batch = make_batch(cfg, ours.decoder_only, arch == "instruct", seed=21)
    with torch.no_grad():
        want = hf(**hf_inputs(batch, cfg.qformer.num_query_tokens, ours.decoder_only)).loss
        got = ours(batch)["loss"]
    assert torch.isfinite(want) and (got - want).abs().item() <= ATOL, (got.item(), want.item())


@pytest.mark.parametrize("arch,kind", [("stage2", "opt"), ("stage2", "t5"), ("instruct", "llama")])
def test_greedy_generation_matches_transformers(arch, kind):
    hf, ours, cfg = build_pair(arch, kind)
    batch = make_batch(cfg, ours.decoder_only, arch == "instruct", seed=22)
    nq = cfg.qformer.num_query_tokens
    prompt = batch["llm_input_ids"][:, :3]  # equal-length prompts: no padding question
    batch = dict(batch, llm_input_ids=prompt, llm_attention_mask=torch.ones_like(prompt))
    inputs = hf_inputs(batch, nq, ours.decoder_only)
    inputs.pop("labels")
    kw = dict(num_beams=1, do_sample=False, max_new_tokens=6, min_new_tokens=6, repetition_penalty=1.0)
    with torch.no_grad():
        want = hf.generate(**inputs, **kw)
        got = ours.generate(batch["pixel_values"], prompt, batch["llm_attention_mask"],
                            batch.get("qformer_input_ids"), batch.get("qformer_attention_mask"), **kw)
    if ours.decoder_only and want.shape[1] > got.shape[1]:
        want = want[:, -got.shape[1]:]  # transformers returns the prompt placeholders + prompt first
    assert torch.equal(got, want), (got, want)
