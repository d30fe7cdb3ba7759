"""Blip2LLM (stage 2 / InstructBLIP) on tiny random towers and tiny HF LLMs loaded from folders:
loss on targets only, frozen towers stay bit-identical, init from stage 1, generation."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blip_train.config.schema import LLMConfig, ModelConfig
from blip_train.models.llm_bridge import Blip2LLM, init_from_earlier_stage_, llm_dtype, load_llm
from blip_train.models.stage1 import Blip2Stage1
from tests.helpers.tiny import tiny_model_config

V, B, T, QT = 64, 3, 7, 5
PAD, BOS, EOS = 1, 2, 2


def tiny_llm_config(kind: str):
    """A tiny random LLM config of `kind` (opt | llama | t5); vocab V, width 24."""
    from transformers import LlamaConfig, OPTConfig, T5Config

    if kind == "opt":
        return OPTConfig(vocab_size=V, hidden_size=24, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                         max_position_embeddings=96, word_embed_proj_dim=24, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS, dropout=0.0)
    if kind == "llama":
        return LlamaConfig(vocab_size=V, hidden_size=24, num_hidden_layers=2, intermediate_size=48,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T5Config(vocab_size=V, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)


def save_tiny_llm(kind: str, folder: Path, seed: int = 0) -> Path:
    """Random tiny LLM saved with save_pretrained (loaded back through the real `load_llm` path)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    cfg = tiny_llm_config(kind)
    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    cls.from_config(cfg).save_pretrained(str(folder))
    return folder


def bridge_config(arch: str, llm_path: str = "", dtype: str = "fp32") -> ModelConfig:
    return tiny_model_config(arch=arch, llm=LLMConfig(path=llm_path, dtype=dtype))


def make_batch(cfg: ModelConfig, decoder_only: bool, instruct: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded text; decoder-only labels mask the first 2 (bos + prompt) positions and padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    lengths = [T, T - 3, 4]
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, PAD)
    if decoder_only:
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100
    else:
        labels = torch.randint(3, V, (B, 4), generator=g)
        labels[2, 2:] = -100
    size = cfg.vision.image_size
    batch = {"pixel_values": torch.randn(B, 3, size, size, generator=g), "llm_input_ids": ids,
             "llm_attention_mask": mask, "llm_labels": labels}
    if instruct:
        qids = torch.randint(5, cfg.qformer.vocab_size, (B, QT), generator=g)
        qmask = torch.ones(B, QT, dtype=torch.long)
        qmask[1, 3:] = 0
        batch.update(qformer_input_ids=qids, qformer_attention_mask=qmask)
    return batch


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llms")
    return {k: save_tiny_llm(k, root / k) for k in ("opt", "llama", "t5")}


def build(arch: str, kind: str, llm_dirs, dtype: str = "fp32") -> Blip2LLM:
    cfg = bridge_config(arch, str(llm_dirs[kind]), dtype)
    torch.manual_seed(0)
    return Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu")


@pytest.mark.parametrize("arch,kind", [("stage2", "opt"), ("stage2", "t5"), ("instruct", "llama"),
                                       ("instruct", "t5")])
def test_loss_is_lm_loss_on_targets_only(arch, kind, llm_dirs):
    model, model_cfg = build(arch, kind, llm_dirs).train(), bridge_config(arch)
    batch = make_batch(model_cfg, model.decoder_only, arch == "instruct")
    out = model(batch)
    assert set(out) == {"loss", "loss_lm"} and torch.isfinite(out["loss"])
    # Reference: the same LLM run by hand, cross-entropy over exactly the target positions.
    with torch.no_grad():
        soft = model.soft_prompt(batch["pixel_values"], batch.get("qformer_input_ids"),
                                 batch.get("qformer_attention_mask"))
        nq = model_cfg.qformer.num_query_tokens
        assert soft.shape == (B, nq, model.llm.config.get_text_config().hidden_size)
        embeds, mask = model.llm_inputs(soft, batch["llm_input_ids"], batch["llm_attention_mask"])
        if model.decoder_only:
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, nq:]  # text positions
            # position t predicts token t+1; the last query position would predict the first text token,
            # which is bos (masked) in every collated batch
            want = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch["llm_labels"][:, 1:].reshape(-1))
        else:
            labels = batch["llm_labels"]
            dec_in = model.llm._shift_right(labels)
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec_in).logits
            want = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
    torch.testing.assert_close(out["loss"].detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "opt"])
def test_bf16_llm_loss_is_computed_in_fp32(kind, llm_dirs):
    """A bf16 LLM's loss is the fp32 cross-entropy of its logits (T5 itself would compute it in bf16)."""
    model = build("stage2", kind, llm_dirs, dtype="bf16").eval()
    batch = make_batch(bridge_config("stage2"), model.decoder_only, False)
    with torch.no_grad():
        loss = model(batch)["loss"]
        embeds, mask = model.llm_inputs(model.soft_prompt(batch["pixel_values"]), batch["llm_input_ids"],
                                        batch["llm_attention_mask"])
        labels = batch["llm_labels"]
        if model.decoder_only:
            nq = model.query_tokens.shape[1]
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, nq:-1]
            labels = labels[:, 1:]
        else:
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask,
                               decoder_input_ids=model.llm._shift_right(labels)).logits
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    want = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1))
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


def test_padding_and_masked_positions_do_not_change_the_loss(llm_dirs):
    model = build("stage2", "opt", llm_dirs).eval()
    batch = make_batch(bridge_config("stage2"), True, False)
    base = model(batch)["loss"]
    other = dict(batch, llm_input_ids=batch["llm_input_ids"].masked_fill(batch["llm_attention_mask"] == 0, 7))
    torch.testing.assert_close(model(other)["loss"], base)  # pad ids are invisible


def test_frozen_towers_bit_identical_after_training(llm_dirs):
    model = build("instruct", "opt", llm_dirs, dtype="bf16")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("llm.", "visual_encoder."))}
    trainable0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert model.llm.dtype == torch.bfloat16 and set(trainable0) and not any(
        n.startswith(("llm.", "visual_encoder.")) for n in trainable0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # every tensor offered
    for step in range(3):
        model.train()
        assert not model.llm.training and not model.visual_encoder.training
        loss = model(make_batch(bridge_config("instruct"), True, True, seed=step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in model.named_parameters() if n in trainable0 and not torch.equal(p, trainable0[n])]
    assert any(n.startswith("qformer.") for n in changed) and "query_tokens" in changed
    assert "llm_proj.weight" in changed and "ln_vision.weight" in changed


def test_qformer_text_branch_only_where_used(llm_dirs):
    s2 = {n for n, _ in build("stage2", "opt", llm_dirs).named_parameters()}
    ins = {n for n, _ in build("instruct", "opt", llm_dirs).named_parameters()}
    assert not any(".lm_head." in n for n in s2 | ins)
    assert not any("word_embeddings" in n or ".ffn." in n for n in s2)
    assert "qformer.embeddings.word_embeddings.weight" in ins and "qformer.layers.0.ffn.fc1.weight" in ins


def test_init_from_stage1_loads_shared_parts(llm_dirs):
    cfg1 = replace(bridge_config("stage1"), arch="stage1")
    torch.manual_seed(1)
    stage1 = Blip2Stage1(cfg1)
    sd = {n: p.detach().clone() for n, p in stage1.named_parameters() if p.requires_grad}
    for arch in ("stage2", "instruct"):
        model = build(arch, "opt", llm_dirs)
        proj_before = model.llm_proj.weight.detach().clone()
        report = init_from_earlier_stage_(model, sd)
        assert report["missing"] == ["llm_proj.bias", "llm_proj.weight"]
        assert torch.equal(model.llm_proj.weight, proj_before)
        assert {"vision_proj.weight", "text_proj.weight", "itm_head.weight", "temp"} <= set(report["unused"])
        params = dict(model.named_parameters())
        for k in report["loaded"]:
            assert torch.equal(params[k], sd[k]), k
        assert "query_tokens" in report["loaded"] and "ln_vision.weight" in report["loaded"]
        text_keys = {k for k in sd if "word_embeddings" in k or ".ffn." in k}
        assert text_keys <= set(report["unused" if arch == "stage2" else "loaded"])
    with pytest.raises(KeyError, match="unexpected keys"):
        init_from_earlier_stage_(build("stage2", "opt", llm_dirs), {**sd, "extra_head.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="missing trainable keys"):
        init_from_earlier_stage_(build("stage2", "opt", llm_dirs), {k: v for k, v in sd.items() if k != "query_tokens"})


def test_instruct_from_stage2_state_keeps_text_input(llm_dirs):
    s2 = build("stage2", "opt", llm_dirs)
    sd = {n: p.detach() + 1 for n, p in s2.named_parameters() if p.requires_grad}
    ins = build("instruct", "opt", llm_dirs)
    report = init_from_earlier_stage_(ins, sd)
    assert "llm_proj.weight" in report["loaded"] and torch.equal(ins.llm_proj.weight, sd["llm_proj.weight"])
    assert "qformer.embeddings.word_embeddings.weight" in report["missing"]


@pytest.mark.parametrize("arch,kind", [("stage2", "opt"), ("instruct", "t5"), ("instruct", "llama")])
def test_generate_shapes(arch, kind, llm_dirs):
    model = build(arch, kind, llm_dirs).eval()
    batch = make_batch(bridge_config(arch), model.decoder_only, arch == "instruct")
    q = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
    ids = model.generate(batch["pixel_values"], num_beams=2, max_new_tokens=4, min_new_tokens=4,
                         repetition_penalty=1.5, **q)
    start = 0 if model.decoder_only else 1  # T5 output starts with the decoder start token
    assert ids.shape == (B, 4 + start)
    prompt = torch.full((B, 2), 5)
    sampled = model.generate(batch["pixel_values"], prompt, torch.ones_like(prompt), num_beams=1,
                             do_sample=True, top_p=0.9, max_new_tokens=3, num_return_sequences=2, **q)
    assert sampled.shape[0] == 2 * B


def test_llm_dtype_rules():
    assert llm_dtype("bf16", "cpu") == torch.bfloat16 and llm_dtype("fp16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        llm_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="serves stage2 | instruct"):
        Blip2LLM(tiny_model_config(), None)  # type: ignore[arg-type]


def _llm_folder_with_tokenizer(kind: str, folder: Path) -> Path:
    """A tiny LLM whose vocabulary is its trained tokenizer's (what a real HF folder holds)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from blip_train.data.tokenizers import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a red circle on the left", "what color is it? red", "a blue square"] * 5, 300,
                              folder, style=kind)
    cfg = tiny_llm_config(kind)
    cfg.vocab_size = len(tok)
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
    if kind == "t5":
        cfg.decoder_start_token_id = tok.pad_token_id
    else:
        cfg.bos_token_id = tok.bos_token_id
    torch.manual_seed(0)
    (AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM).from_config(cfg).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("arch,kind", [("stage2", "opt"), ("instruct", "t5")])
def test_builders_load_sources_and_init_from_file(arch, kind, tmp_path):
    from safetensors.torch import save_file

    from blip_train.config.schema import ExperimentConfig, StreamConfig
    from blip_train.data.tokenizers import train_wordpiece_tokenizer
    from blip_train.models.world import WorldInfo
    from blip_train.training.stages import build_stage

    train_wordpiece_tokenizer(["what color is the circle", "a short image description"] * 5, 100, tmp_path / "q")
    cfg1 = replace(bridge_config("stage1"), arch="stage1")
    torch.manual_seed(3)
    stage1_sd = {n: p.detach().clone() for n, p in Blip2Stage1(cfg1).named_parameters() if p.requires_grad}
    save_file(stage1_sd, str(tmp_path / "stage1.safetensors"))
    model_cfg = replace(bridge_config(arch, str(_llm_folder_with_tokenizer(kind, tmp_path / kind))),
                        init_from=str(tmp_path / "stage1.safetensors"))
    model_cfg.qformer.tokenizer = str(tmp_path / "q")
    cfg = ExperimentConfig(model=model_cfg)
    cfg.data.train = [StreamConfig(local="unused-here")]
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    assert stage.data_kind == ("caption" if arch == "stage2" else "instruct")
    assert stage.frozen_sources["llm"] == model_cfg.llm.path and "vision" in stage.frozen_sources
    assert torch.equal(stage.model.query_tokens, stage1_sd["query_tokens"])
    img = torch.randn(3, 32, 32)
    samples = [{"pixel_values": img, "caption": "a red circle on the left", "task": "vqa",
                "question": "what color is it?", "answer": "red", "draw_seed": i} for i in range(2)]
    batch = stage.collate(samples)
    assert ("qformer_input_ids" in batch) == (arch == "instruct")
    assert torch.isfinite(stage.model(batch)["loss"])
