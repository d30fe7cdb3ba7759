"""BlipPretrain (BLIP / ALBEF) on one rank: losses, what trains, the momentum copies and the feature queue."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from blip_train.config.schema import MomentumConfig, TextConfig
from blip_train.models.blip import BlipPretrain, TextTokens
from blip_train.models.med_decoding import decode
from blip_train.training.momentum import load_momentum_state_, momentum_state, update_momentum_
from tests.helpers.tiny import tiny_model_config, tiny_vision_config

TOKENS = TextTokens(pad=0, cls=2, sep=1, mask=5, enc=4, dec=3, vocab_size=120)
B, T = 4, 7


def blip_config(arch: str = "blip", **momentum):
    text = TextConfig(hidden_size=32, layers=2, heads=4, intermediate_size=64, vocab_size=120,
                      max_position_embeddings=64, dropout=0.0, fusion_layer=0 if arch == "blip" else 1,
                      decoder=arch == "blip")
    return tiny_model_config(arch=arch, text=text, vision=tiny_vision_config(frozen=False, final_norm=True),
                             momentum=MomentumConfig(**{"queue_size": 16, "alpha": 0.4, **momentum}))


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 120, (B, T), generator=g)
    ids[:, 0] = TOKENS.cls
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = TOKENS.pad
    ids[torch.arange(B), mask.sum(1) - 1] = TOKENS.sep
    itm, dec = ids.clone(), ids.clone()
    itm[:, 0], dec[:, 0] = 4, 3  # [ENC], [DEC]
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=g), "text_ids": ids, "text_mask": mask,
            "itm_input_ids": itm, "itg_input_ids": dec, "itg_labels": dec.masked_fill(mask == 0, -100),
            "image_ids": torch.arange(B)}


@pytest.mark.parametrize("arch", ["blip", "albef"])
def test_losses_train_the_online_model_only(arch):
    torch.manual_seed(0)
    model = BlipPretrain(blip_config(arch), TOKENS).train()
    out = model(make_batch())
    text_loss = "loss_lm" if arch == "blip" else "loss_mlm"
    assert set(out) == {"loss", "loss_itc", "loss_itm", text_loss}
    assert torch.isfinite(out["loss"]) and out["loss"] == out["loss_itc"] + out["loss_itm"] + out[text_loss]
    out["loss"].backward()
    copies = {id(m) for _, m in model.momentum_pairs()}
    for name, p in model.named_parameters():
        if id(p) in copies:
            assert not p.requires_grad and p.grad is None, name
    # Every part of the online model gets a gradient: ViT, text, projections, ITM head, temperature.
    for prefix in ("visual_encoder.blocks.0.", "text.layers.1.", "vision_proj.", "text_proj.", "itm_head.", "temp"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), prefix


def test_momentum_copies_pair_every_online_tensor_once():
    model = BlipPretrain(blip_config(), TOKENS)
    pairs = list(model.momentum_pairs())
    assert all(p.shape == m.shape and p is not m for p, m in pairs)
    assert len({id(m) for _, m in pairs}) == len(pairs)  # a tied alias is moved once, not twice
    assert all(torch.equal(p, m) for p, m in pairs)  # copies start as the online weights
    # BLIP's momentum text encoder is unimodal: no cross-attention or decoder copies.
    names = [n for n, _ in model.named_parameters() if n.startswith("text_m.")]
    assert names and not any("cross_attn" in n or "self_attn_dec" in n for n in names)
    albef = BlipPretrain(blip_config("albef"), TOKENS)
    assert any("cross_attn" in n for n, _ in albef.named_parameters() if n.startswith("text_m."))


def test_queue_fills_in_training_only_and_the_copies_follow_the_ema():
    torch.manual_seed(0)
    model = BlipPretrain(blip_config(), TOKENS)
    before = model.queue.image_queue.clone()
    model.eval()(make_batch())
    assert torch.equal(model.queue.image_queue, before) and int(model.queue.ptr) == 0
    model.train()(make_batch())
    assert int(model.queue.ptr) == B and not torch.equal(model.queue.image_queue[:, :B], before[:, :B])
    assert torch.equal(model.queue.image_queue[:, B:], before[:, B:])

    with torch.no_grad():
        for p, _ in model.momentum_pairs():
            p.add_(torch.randn_like(p))
    old = [m.detach().clone() for _, m in model.momentum_pairs()]
    update_momentum_(model, 0.9)
    for (p, m), m0 in zip(model.momentum_pairs(), old):
        assert torch.allclose(m, 0.9 * m0 + 0.1 * p, rtol=0, atol=1e-6)


def test_momentum_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BlipPretrain(blip_config(), TOKENS).train()
    model(make_batch())
    with torch.no_grad():
        for _, m in model.momentum_pairs():
            m.add_(1.0)
    torch.save({"momentum": momentum_state(model)}, tmp_path / "rank_00000.pt")
    torch.manual_seed(1)
    fresh = BlipPretrain(blip_config(), TOKENS)
    load_momentum_state_(fresh, tmp_path)
    for (_, a), (_, b) in zip(model.momentum_pairs(), fresh.momentum_pairs()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(model.queue.buffers(), fresh.queue.buffers()))


def test_distillation_weight_ramps_with_the_step():
    torch.manual_seed(0)
    model = BlipPretrain(blip_config(alpha_ramp_steps=10), TOKENS).eval()
    batch = make_batch()
    model.train_step = 0
    hard = model(batch)["loss_itc"]
    model.train_step = 5
    half = model(batch)["loss_itc"]
    model.mom = replace(model.mom, alpha_ramp_steps=0)
    assert not torch.equal(hard, half) and not torch.equal(half, model(batch)["loss_itc"])


def test_blip_refuses_a_med_without_decoder():
    cfg = blip_config()
    with pytest.raises(ValueError, match="model.text.decoder"):
        BlipPretrain(replace(cfg, text=replace(cfg.text, decoder=False)), TOKENS)


def test_vit_loads_an_imagenet_timm_checkpoint(tmp_path):
    """BLIP / ALBEF start from a timm ViT/DeiT .pth: {"model": ...}, a full qkv bias, a classifier head."""
    from blip_train.models.eva_vit import EVAViT, load_vit_weights

    cfg = tiny_vision_config(frozen=False, final_norm=True, drop_last_block=False)
    torch.manual_seed(0)
    source = EVAViT(cfg)
    sd = {}
    for k, v in source.state_dict().items():
        if k.endswith("attn.q_bias"):
            q, vb = v, source.state_dict()[k.replace("q_bias", "v_bias")]
            sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.randn_like(q), vb])  # any k bias
        elif not k.endswith("attn.v_bias"):
            sd[k] = v
    sd.update({"head.weight": torch.randn(10, cfg.width), "head.bias": torch.randn(10)})
    torch.save({"model": sd}, tmp_path / "deit.pth")
    model = EVAViT(cfg)
    load_vit_weights(model, tmp_path / "deit.pth")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), source(x))


def test_greedy_captions_from_the_decoder():
    """generate: max_new_tokens ids after the prompt, [SEP] ends a caption and [PAD] follows; the first token is
    the decoder's argmax given [DEC]; ALBEF has no decoder."""
    torch.manual_seed(0)
    model = BlipPretrain(blip_config(), TOKENS).eval()
    px = make_batch()["pixel_values"]
    prompt = torch.full((B, 1), 3)  # [DEC]
    ids = model.generate(px, prompt, max_new_tokens=6, min_new_tokens=0)
    assert ids.shape == (B, 6)
    embeds = model.visual_encoder(px)
    first = model.text.lm_logits(model.text(prompt, torch.ones_like(prompt), image_embeds=embeds, mode="decoder"))
    assert torch.equal(ids[:, 0], first[:, -1].argmax(-1))
    # Force [SEP] as the most likely first token: everything after it is padding.
    with torch.no_grad():
        model.text.lm_head.decoder.bias[TOKENS.sep] = 1e4
    ids = model.generate(px, prompt, max_new_tokens=4, min_new_tokens=0)
    assert (ids[:, 0] == TOKENS.sep).all() and (ids[:, 1:] == TOKENS.pad).all()
    assert (model.generate(px, prompt, max_new_tokens=4, min_new_tokens=2)[:, :2] != TOKENS.sep).all()
    with pytest.raises(ValueError, match="no text decoder"):
        BlipPretrain(blip_config("albef"), TOKENS).generate(px, prompt)


def test_capfilt_captions_from_the_decoder():
    """generate_captions (CapFilt's contract): [DEC] then max_len - 1 tokens per caption, image-major; greedy
    equals `generate`; nucleus sampling is a function of the generator; a tiny top_p is greedy."""
    torch.manual_seed(0)
    model = BlipPretrain(blip_config(), TOKENS).eval()
    px = make_batch()["pixel_values"]
    greedy = model.generate_captions(px, 3, TOKENS.sep, TOKENS.pad, max_len=6, num_captions=2)
    assert greedy.shape == (2 * B, 6) and (greedy[:, 0] == 3).all()
    assert torch.equal(greedy[0::2], greedy[1::2])
    assert torch.equal(greedy[0::2, 1:], model.generate(px, torch.full((B, 1), 3), max_new_tokens=5))
    g = [torch.Generator().manual_seed(7) for _ in range(2)]
    a, b = (model.generate_captions(px, 3, TOKENS.sep, TOKENS.pad, max_len=6, top_p=0.9, generator=x) for x in g)
    assert torch.equal(a, b)
    tiny = model.generate_captions(px, 3, TOKENS.sep, TOKENS.pad, max_len=6, top_p=1e-9, generator=g[0])
    assert torch.equal(tiny, greedy[0::2])


def test_retrieval_objective_makes_every_caption_of_an_image_a_positive(monkeypatch):
    """model.objective=retrieval: ITC + ITM only; the ITC targets spread over the same-image columns of the batch
    and the queue (exactly `momentum_itc_loss` with the image ids: the copies equal the online model at build);
    the queue keeps the ids; the decoder's self-attention and the LM head's transform are frozen (unused), the
    tied word embeddings still train."""
    import blip_train.models.blip as blip_module
    from blip_train.models.blip_losses import momentum_itc_loss

    seen = []  # the ids the model hands the loss (its definition with ids is tested in test_blip_losses.py)
    monkeypatch.setattr(blip_module, "momentum_itc_loss", lambda *a: seen.append(a[7]) or momentum_itc_loss(*a))
    torch.manual_seed(0)
    cfg = replace(blip_config(), objective="retrieval")
    model = BlipPretrain(cfg, TOKENS).train()
    batch = make_batch()
    batch["image_ids"] = torch.tensor([5, 5, 6, 7])  # two captions of image 5
    with torch.no_grad():
        model.eval()  # the same features as the training forward (no dropout in this config)
        img = model.encode_image(batch["pixel_values"])[1][:, 0]
        txt = model.encode_text(batch["text_ids"], batch["text_mask"])
        queue = type(model.queue)(cfg.embed_dim, cfg.momentum.queue_size, with_idx=True)
        queue.load_state_dict(model.queue.state_dict())
        model.train()
    expected = momentum_itc_loss(img, txt, img, txt, queue, model._temperature(), 0.4, batch["image_ids"]).loss
    out = model(batch)
    assert set(out) == {"loss", "loss_itc", "loss_itm"} and out["loss"] == out["loss_itc"] + out["loss_itm"]
    torch.testing.assert_close(out["loss_itc"], expected, rtol=1e-5, atol=1e-6)
    assert len(seen) == 1 and torch.equal(seen[0], batch["image_ids"])
    assert model.queue.idx_queue[0, :B].tolist() == [5, 5, 6, 7]
    frozen = {n for n, p in model.named_parameters()
              if not p.requires_grad and not n.startswith(tuple(model.MOMENTUM.values()))}
    assert frozen and all(".self_attn_dec." in n or n.startswith("text.lm_head.") for n in frozen), frozen
    assert "text.lm_head.decoder.bias" in frozen
    assert model.text.lm_head.decoder.weight.requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lm_head" not in n)


def test_caption_objective_trains_the_decoder_after_the_prompt():
    """model.objective=caption: no momentum model or queue; the loss is the decoder's LM loss alone (labels as the
    collator gives them); the encoder's self-attention and the ITC / ITM heads are frozen and refuse to score;
    captions are generated after [DEC] + the prompt, which the returned ids leave out."""
    from blip_train.models.blip_losses import lm_loss

    torch.manual_seed(0)
    model = BlipPretrain(replace(blip_config(), objective="caption"), TOKENS).train()
    assert list(model.momentum_pairs()) == [] and model.queue is None
    batch = make_batch()
    out = model(batch)
    assert set(out) == {"loss", "loss_lm"}
    image_embeds = model.visual_encoder(batch["pixel_values"])
    hidden = model.text(batch["itg_input_ids"], batch["text_mask"], image_embeds=image_embeds, mode="decoder")
    torch.testing.assert_close(out["loss"], lm_loss(model.text.lm_logits(hidden), batch["itg_labels"]))
    out["loss"].backward()
    for name, p in model.named_parameters():
        unused = ".self_attn." in name or name.startswith(("vision_proj.", "text_proj.", "itm_head.")) or name == "temp"
        assert p.requires_grad != unused, name
        if p.requires_grad:
            assert p.grad is not None, name
    with pytest.raises(ValueError, match="does not train the ITC / ITM heads"):
        model.itm_scores(torch.zeros(1, 5, 48), batch["text_ids"][:1], batch["text_mask"][:1])

    model.eval()
    model.prompt_ids = [40, 41]
    px = batch["pixel_values"]
    ids = model.generate_captions(px, 3, TOKENS.sep, TOKENS.pad, max_len=5)
    start = torch.tensor([[3, 40, 41]] * B)
    full = decode(model.text, model.visual_encoder(px), start, 4, 1, TOKENS.sep, TOKENS.pad)
    assert ids.shape == (B, 5) and torch.equal(ids[:, 0], torch.full((B,), 3)) and torch.equal(ids[:, 1:], full[:, 3:])


def test_a_retrieval_run_does_not_caption():
    model = BlipPretrain(replace(blip_config(), objective="retrieval"), TOKENS).eval()
    with pytest.raises(ValueError, match="does not train the decoder"):
        model.generate_captions(make_batch()["pixel_values"], 3, TOKENS.sep, TOKENS.pad, max_len=4)


def test_beam_search_keeps_the_likelier_caption_greedy_decoding_misses():
    """A 4-token language (0 = end): greedy takes token 1 (p 0.6) then can only end badly; two beams find
    2 -> 3 -> end, the likelier whole sequence. One beam is greedy; min_new_tokens forbids an early end."""
    from blip_train.models.beam_search import beam_search

    table = torch.log(torch.tensor([[0.1, 0.6, 0.3, 0.0],     # after the prompt (token 3 as the start)
                                    [0.34, 0.33, 0.0, 0.33],  # after 1: nothing good
                                    [0.0, 0.0, 0.0, 1.0],     # after 2: 3 for sure
                                    [1.0, 0.0, 0.0, 0.0]]).clamp_min(1e-9))
    start = torch.tensor([[3], [3]])

    def next_logits(ids):  # the prompt alone reads row 0; after that, the row of the last token
        return table[0].expand(ids.shape[0], -1) if ids.shape[1] == 1 else table[ids[:, -1]]

    greedy = beam_search(next_logits, start, 3, 1, eos_id=0, pad_id=9, length_penalty=0.0)
    beams = beam_search(next_logits, start, 3, 2, eos_id=0, pad_id=9, length_penalty=0.0)
    assert greedy.tolist() == [[1, 0, 9]] * 2 and beams.tolist() == [[2, 3, 0]] * 2
    later = beam_search(next_logits, start, 3, 2, eos_id=0, pad_id=9, min_new_tokens=3, length_penalty=0.0)
    assert (later[:, :2] != 0).all()
