"""Audio through the LLM stages (model.modality=audio, X-InstructBLIP's audio branch): a frozen transformers
ASTModel in the ViT's place, each filterbank segment through it and the Q-Former, a learned segment embedding,
the segments' queries in time order after the modality prefix ("audio: ") in the LLM's input."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip_train.config.schema import AudioConfig
from blip_train.data.audio import (AudioFeatures, CorruptAudioError, audio_features, encode_flac, decode_flac,
                                   model_audio_features)
from blip_train.models.llm_bridge import Blip2LLM, load_llm
from tests.unit.test_llm_bridge import bridge_config, llm_dirs, make_batch  # noqa: F401 (fixture)

FRAMES, BINS, SEGMENTS = 64, 32, 2


def save_tiny_ast(folder: Path, seed: int = 0, frames: int = FRAMES, bins: int = BINS) -> Path:
    """A random tiny ASTModel folder as released AST weights come: config, weights, feature extractor config."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(seed)
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    patch_size=16, frequency_stride=16, time_stride=16, max_length=frames, num_mel_bins=bins,
                    attn_implementation="eager")
    ASTModel(cfg).save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=bins, max_length=frames, mean=-3.0, std=2.5).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory) -> Path:
    return save_tiny_ast(tmp_path_factory.mktemp("ast") / "ast")


def audio_config(kind: str, llm_dirs, ast_dir, arch: str = "instruct", prefix: str = "audio: "):  # noqa: F811
    base = bridge_config(arch, str(llm_dirs[kind]))
    return replace(base, modality="audio", modality_prefix=prefix, attention="math",
                   audio=AudioConfig(encoder=str(ast_dir), segments=SEGMENTS))


def build_audio(kind: str, llm_dirs, ast_dir, arch: str = "instruct") -> tuple[Blip2LLM, list[int]]:  # noqa: F811
    """The model with the prefix given as token ids (these tiny LLM folders have no tokenizer; the trainer's
    builder tokenizes model.modality_prefix with the LLM's)."""
    cfg = audio_config(kind, llm_dirs, ast_dir, arch)
    prefix = [7, 8, 9]
    torch.manual_seed(0)
    model = Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu", prefix_ids=prefix)
    return model, prefix


def tone(seconds: float, hz: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.3 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def test_features_are_the_ast_feature_extractors(ast_dir):
    """One segment of the stored clip equals what transformers' ASTFeatureExtractor (the folder's own config: its
    bins, frames, mean and std) gives for the same waveform; a longer clip is cut into segments in time order."""
    from transformers import ASTFeatureExtractor

    spec = audio_features(str(ast_dir), segments=1)
    assert (spec.frames, spec.bins, spec.mean, spec.std) == (FRAMES, BINS, -3.0, 2.5)
    flac = encode_flac(tone(0.5))
    ours = spec({"audio": flac})  # (1, 64, 32)
    reference = ASTFeatureExtractor.from_pretrained(ast_dir)(decode_flac(flac).numpy(), sampling_rate=16000,
                                                              return_tensors="pt")["input_values"]
    assert ours.shape == reference.shape == (1, FRAMES, BINS)
    assert (ours - reference).abs().max() < 1e-3
    two = replace(spec, segments=2)({"audio": encode_flac(tone(1.0))})  # 98 frames: 64, then 34 + padding
    assert two.shape == (2, FRAMES, BINS)
    assert torch.all(two[1, 34:] == (0 - spec.mean) / (2 * spec.std))  # padded frames: zeros, normalised
    with pytest.raises(CorruptAudioError, match="undecodable FLAC"):
        spec({"audio": b"fLaC not really"})
    with pytest.raises(ValueError, match="no audio column"):
        spec({"image": b"", "dataset": "coco"})


def test_audio_soft_prompt_is_the_ast_tokens_through_the_qformer(llm_dirs, ast_dir):  # noqa: F811
    """Each segment's queries are the Q-Former's read of that segment's ASTModel states (the reference module,
    called directly), plus the segment's embedding, in time order; the modality prefix's embeddings come first in
    the LLM's input and are never targets."""
    from transformers import ASTModel

    model, prefix = build_audio("llama", llm_dirs, ast_dir)
    model.eval()
    batch = make_batch(bridge_config("instruct"), decoder_only=True, instruct=True)
    b = batch["llm_input_ids"].shape[0]
    audio = torch.randn(b, SEGMENTS, FRAMES, BINS, generator=torch.Generator().manual_seed(1))
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    reference = ASTModel.from_pretrained(ast_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        model.frame_pos.normal_()
        soft = model.soft_prompt(audio, ids, mask)
        nq = model.query_tokens.shape[1]
        assert soft.shape == (b, SEGMENTS * nq, model.llm.config.hidden_size)
        for s in range(SEGMENTS):
            states = model.ln_vision(reference(input_values=audio[:, s]).last_hidden_state)
            q = model.qformer(query_embeds=model.query_tokens.expand(b, -1, -1), image_embeds=states,
                              input_ids=ids, attention_mask=mask, mask="bidirectional").last_hidden_state[:, :nq]
            expected = model.llm_proj(q + model.frame_pos[s])
            assert torch.allclose(soft[:, s * nq:(s + 1) * nq], expected, atol=1e-5), s
        embeds, full_mask = model.llm_inputs(soft, batch["llm_input_ids"], batch["llm_attention_mask"])
        table = model.llm.get_input_embeddings().weight
        assert len(prefix) > 0 and torch.equal(embeds[0, :len(prefix)], table[prefix])
        assert torch.equal(embeds[:, len(prefix):len(prefix) + soft.shape[1]], soft)
        assert embeds.shape[1] == full_mask.shape[1] == len(prefix) + soft.shape[1] + batch["llm_input_ids"].shape[1]
        # The loss: the LLM's own CE over the text targets only (prefix and queries ignored).
        batch["pixel_values"] = audio
        loss = model(batch)["loss"]
        logits = model.llm(inputs_embeds=embeds, attention_mask=full_mask).logits[:, -batch["llm_labels"].shape[1]:]
        manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 batch["llm_labels"][:, 1:].reshape(-1), ignore_index=-100)
        assert torch.allclose(loss, manual, atol=1e-5)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_audio_training_reaches_the_qformer_not_the_encoder(kind, llm_dirs, ast_dir):  # noqa: F811
    arch = "stage2" if kind == "opt" else "instruct"
    model, _ = build_audio(kind, llm_dirs, ast_dir, arch)
    model.train()
    batch = make_batch(bridge_config(arch), decoder_only=model.decoder_only, instruct=arch == "instruct")
    b = batch["llm_input_ids"].shape[0]
    batch["pixel_values"] = torch.randn(b, SEGMENTS, FRAMES, BINS)
    model(batch)["loss"].backward()
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())
    assert not model.audio_encoder.training  # frozen: stays in eval mode
    assert model.frame_pos.grad is not None and (model.frame_pos.grad.abs().sum(1) > 0).all()
    assert model.ln_vision.weight.grad is not None and model.query_tokens.grad.abs().sum() > 0
    out = model.eval().generate(batch["pixel_values"][:1], max_new_tokens=3, num_beams=1,
                                **({"qformer_input_ids": batch["qformer_input_ids"][:1],
                                    "qformer_attention_mask": batch["qformer_attention_mask"][:1]}
                                   if arch == "instruct" else {}))
    assert out.shape[0] == 1
    with pytest.raises(ValueError, match=r"3 audio segments per sample, this model takes 2 \(model.audio.segments\)"):
        model.soft_prompt(torch.zeros(1, 3, FRAMES, BINS), batch.get("qformer_input_ids"),
                          batch.get("qformer_attention_mask"))
    with pytest.raises(ValueError, match=r"\(100, 32\) \(frames, bins\); this encoder takes \(64, 32\)"):
        model.soft_prompt(torch.zeros(1, 2, 100, BINS), batch.get("qformer_input_ids"),
                          batch.get("qformer_attention_mask"))


def test_audio_step_matches_flop_counter(llm_dirs, ast_dir):  # noqa: F811
    """The frozen AST forward (2N per token plus attention, its patch convolution included) per segment, the
    Q-Former per segment, and the LLM over prefix + segments x queries + text: torch's FlopCounterMode agrees."""
    from torch.utils.flop_counter import FlopCounterMode

    from blip_train.training.flops import batch_tokens, build_flops_counter

    model, prefix = build_audio("llama", llm_dirs, ast_dir)
    for config in (model.llm.config, model.audio_encoder.ast.config):  # FlopCounterMode does not see fused SDPA
        config._attn_implementation = "eager"
    model.train()
    cfg = audio_config("llama", llm_dirs, ast_dir)
    batch = make_batch(bridge_config("instruct"), decoder_only=True, instruct=True)
    batch["pixel_values"] = torch.randn(batch["llm_input_ids"].shape[0], SEGMENTS, FRAMES, BINS)
    with FlopCounterMode(display=False) as counter:
        model(batch)["loss"].backward()
    tokens, flops = build_flops_counter(cfg, model)(batch)
    assert flops == pytest.approx(counter.get_total_flops(), rel=1e-4)
    n_tokens = 2 + (BINS // 16) * (FRAMES // 16)
    assert tokens == batch_tokens(batch, n_tokens, sample_dims=2) == (
        batch["llm_input_ids"].shape[0] * SEGMENTS * n_tokens + int(batch["llm_attention_mask"].sum())
        + int(batch["qformer_attention_mask"].sum()))


def test_the_run_reads_its_encoders_features_and_refuses_what_does_not_fit(ast_dir, tmp_path):
    from blip_train.config import ConfigError, load_config
    from blip_train.config.validate import validate_config as validate

    cfg = load_config("demo/stage1")
    assert model_audio_features(cfg.model) is None
    cfg.model.modality, cfg.model.audio.encoder, cfg.model.audio.segments = "audio", str(ast_dir), 3
    assert model_audio_features(cfg.model) == AudioFeatures(segments=3, frames=FRAMES, bins=BINS, mean=-3.0,
                                                            std=2.5)
    with pytest.raises(ConfigError, match="model.modality: audio feeds an LLM through the Q-Former"):
        validate(cfg)
    cfg.model.arch = "instruct"
    cfg.model.llm.path = str(tmp_path)
    cfg.model.audio.encoder = ""
    with pytest.raises(ConfigError, match="model.audio.encoder: required for model.modality=audio"):
        validate(cfg)
    cfg.model.modality = "smell"
    with pytest.raises(ConfigError, match="model.modality: must be image, audio or 3d, got 'smell'"):
        validate(cfg)
    pre = json.loads((ast_dir / "preprocessor_config.json").read_text())
    (tmp_path / "config.json").write_text((ast_dir / "config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, "do_normalize": False}))
    with pytest.raises(ValueError, match="do_normalize is false"):
        audio_features(str(tmp_path), 2)


def test_the_training_loader_reads_audio_features_and_skips_a_corrupt_clip(ast_dir, tmp_path):
    """The loader gives each clip's segments as pixel_values (what the model reads); a clip whose FLAC does not
    decode is replaced by the next one of its stream and counted, as an undecodable image is."""
    from blip_train.config.schema import DataConfig, StreamConfig
    from blip_train.data.audio import AUDIO_COLUMNS
    from blip_train.data.datasets import build_train_loader
    from blip_train.data.schema import write_split
    from blip_train.data.synthetic_audio import make_clip

    rows = [make_clip(i, seed=0, seconds=1.0) for i in range(8)]
    rows[3]["audio"] = b"fLaC" + b"\0" * 100
    write_split(tmp_path / "tones", rows, extra_columns=AUDIO_COLUMNS)
    cfg = DataConfig(train=[StreamConfig(local=str(tmp_path / "tones"))], num_workers=0)
    spec = audio_features(str(ast_dir), SEGMENTS)
    loader = build_train_loader(cfg, 4, reader=spec)
    batches = list(loader)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(4, SEGMENTS, FRAMES, BINS)] * 2
    ids = sorted(int(i) for b in batches for i in b["image_id"])
    assert 3 not in ids and ids.count(4) == 2 and loader.dataset.num_corrupt == 1
    first = next(b for b in batches if 0 in [int(i) for i in b["image_id"]])
    at = [int(i) for i in first["image_id"]].index(0)
    assert torch.equal(first["pixel_values"][at], spec(rows[0]))
