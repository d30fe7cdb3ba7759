"""MED (BLIP) and ALBEF's text/fusion BERT: structure, the three modes, masks, decoder sharing, BERT init."""
from __future__ import annotations

import pytest
import torch

from blip_train.models.med import MED
from blip_train.models.qformer import load_bert_weights
from tests.helpers.tiny import tiny_bert_config, tiny_text_config

B, T, NIMG, WIDTH, D, V = 2, 6, 5, 24, 32, 120


def build(seed: int = 0, **overrides) -> MED:
    torch.manual_seed(seed)
    return MED(tiny_text_config(**overrides), encoder_width=WIDTH, attention="sdpa").eval()


def albef(seed: int = 0) -> MED:
    """ALBEF's split at tiny size: layer 0 text only, layer 1 fusion; no decoder."""
    return build(seed, layers=2, fusion_layer=1, decoder=False)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(1, V, (B, T), generator=g), torch.tensor([[1] * T, [1] * 4 + [0] * (T - 4)]),
            torch.randn(B, NIMG, WIDTH, generator=g))


def test_structure_and_init():
    med = build()
    assert [layer.cross_attn is not None for layer in med.layers] == [True, True]
    assert all(layer.self_attn_dec is not None for layer in med.layers)
    assert med.layers[0].cross_attn.key.in_features == WIDTH
    assert med.lm_head.decoder.weight is med.embeddings.word_embeddings.weight
    for name, p in med.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert 0.015 < p.std() < 0.025, name  # N(0, 0.02)
    model = albef()
    assert [layer.cross_attn is not None for layer in model.layers] == [False, True]
    assert all(layer.self_attn_dec is None for layer in model.layers)


def test_state_dict_names():
    keys = set(build().state_dict())
    for part in ("self_attn", "self_attn_dec", "cross_attn"):
        for p in ("query", "key", "value", "out", "norm"):
            assert f"layers.1.{part}.{p}.weight" in keys
    assert {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.norm.bias",
            "layers.0.ffn.fc1.weight", "layers.0.ffn.fc2.bias", "layers.0.ffn.norm.weight", "lm_head.dense.weight",
            "lm_head.norm.weight", "lm_head.decoder.weight", "lm_head.decoder.bias"} <= keys


def test_mode_shapes():
    med, (ids, am, image) = build(), inputs()
    for mode in ("text", "multimodal", "decoder"):
        hidden = med(ids, am, image_embeds=None if mode == "text" else image, mode=mode)
        assert hidden.shape == (B, T, D), mode
    assert med.lm_logits(hidden).shape == (B, T, V)


def test_text_mode_ignores_cross_attention_and_padding():
    med, (ids, am, image) = build(), inputs()
    text = med(ids, am, mode="text")
    with torch.no_grad():
        for layer in med.layers:
            layer.cross_attn.value.weight.add_(1.0)
    torch.testing.assert_close(med(ids, am, mode="text"), text, atol=0, rtol=0)
    assert not torch.allclose(med(ids, am, image_embeds=image, mode="multimodal"), text, atol=1e-3)
    other = ids.clone()
    other[1, 4:] = 7  # padded positions: another token changes nothing at the real ones
    torch.testing.assert_close(med(other, am, mode="text")[1, :4], text[1, :4], atol=1e-6, rtol=0)


def test_decoder_is_causal():
    med, (ids, am, image) = build(), inputs()
    out = med(ids, am, image_embeds=image, mode="decoder")
    later = ids.clone()
    later[:, 3:] = 5
    torch.testing.assert_close(med(later, am, image_embeds=image, mode="decoder")[:, :3], out[:, :3],
                               atol=1e-6, rtol=0)
    encoder = med(later, am, image_embeds=image, mode="multimodal")
    assert not torch.allclose(encoder[:, :3], med(ids, am, image_embeds=image, mode="multimodal")[:, :3], atol=1e-3)


def test_image_mask_equals_dropping_the_padded_image_tokens():
    med, (ids, am, image) = build(), inputs()
    image_mask = torch.tensor([[1] * NIMG, [1] * 3 + [0] * (NIMG - 3)])
    for mode in ("multimodal", "decoder"):
        masked = med(ids, am, image_embeds=image, image_mask=image_mask, mode=mode)
        alone = med(ids[1:], am[1:], image_embeds=image[1:, :3], mode=mode)
        torch.testing.assert_close(masked[1:], alone, atol=1e-5, rtol=0)


def test_albef_fusion_on_text_output_equals_multimodal_from_ids():
    model, (ids, am, image) = albef(), inputs()
    text = model(ids, am, mode="text")
    fused = model(None, am, image_embeds=image, mode="multimodal", text_hidden=text)
    torch.testing.assert_close(fused, model(ids, am, image_embeds=image, mode="multimodal"), atol=1e-6, rtol=0)
    # text mode runs only the layers below fusion_layer
    torch.testing.assert_close(text, model.layers[0](model.embeddings(None, ids), am.bool()[:, None, None, :],
                                                     False, None, None), atol=0, rtol=0)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied weights are counted once


def test_decoder_shares_all_but_the_self_attention():
    with_decoder, without = build(), build(decoder=False)
    self_attn = n_params(with_decoder.layers[0].self_attn)
    assert n_params(with_decoder) == n_params(without) + len(with_decoder.layers) * self_attn

    med, (ids, am, image) = build(), inputs()
    grads = {}
    for mode in ("multimodal", "decoder"):
        med.zero_grad(set_to_none=True)
        med.lm_logits(med(ids, am, image_embeds=image, mode=mode)).square().mean().backward()
        grads[mode] = {n for n, p in med.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    only_encoder, only_decoder = grads["multimodal"] - grads["decoder"], grads["decoder"] - grads["multimodal"]
    assert only_encoder and all(".self_attn." in n for n in only_encoder)
    assert only_decoder and all(".self_attn_dec." in n for n in only_decoder)
    shared = grads["multimodal"] & grads["decoder"]
    assert {n.split(".")[0] for n in shared} == {"embeddings", "layers", "lm_head"}
    assert any(".cross_attn." in n for n in shared) and any(".ffn." in n for n in shared)


def test_gradient_checkpointing_matches():
    (ids, am, image) = inputs()
    grads = []
    for ckpt in (False, True):
        med = build(grad_checkpointing=ckpt).train()
        med(ids, am, image_embeds=image, mode="decoder").sum().backward()
        grads.append({n: p.grad.clone() for n, p in med.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=0)


def test_invalid_calls_and_configs():
    med, (ids, am, image) = build(), inputs()
    with pytest.raises(ValueError, match="mode="):
        med(ids, am, mode="fusion")
    with pytest.raises(ValueError, match="image_embeds is required"):
        med(ids, am, mode="multimodal")
    with pytest.raises(ValueError, match="takes no image_embeds"):
        med(ids, am, image_embeds=image, mode="text")
    with pytest.raises(ValueError, match="fusion_layer > 0"):
        med(None, am, image_embeds=image, mode="multimodal", text_hidden=torch.zeros(B, T, D))
    with pytest.raises(ValueError, match="not both"):
        med(ids, am, mode="text", text_hidden=torch.zeros(B, T, D))
    with pytest.raises(ValueError, match="model.text.decoder=true"):
        albef()(ids, am, image_embeds=image, mode="decoder")
    with pytest.raises(ValueError, match="model.text.max_position_embeddings"):
        med(torch.ones(1, 65, dtype=torch.long), mode="text")
    with pytest.raises(ValueError, match="model.text.fusion_layer"):
        build(fusion_layer=2)


def test_load_bert_weights(tmp_path):
    from transformers import BertForMaskedLM

    cfg = tiny_text_config()
    torch.manual_seed(5)
    bert = BertForMaskedLM(tiny_bert_config(cfg, vocab_size=V - 2)).eval()  # no [DEC], [ENC]
    with torch.no_grad():  # MED has no segments: make BERT's segment-0 embedding zero
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
    bert.save_pretrained(tmp_path)
    med = build(seed=9)
    extra_rows = med.embeddings.word_embeddings.weight[-2:].clone()
    cross = med.layers[1].cross_attn.query.weight.clone()
    left_random = load_bert_weights(med, tmp_path)
    assert left_random and all(".cross_attn." in k for k in left_random)
    assert torch.equal(med.layers[1].cross_attn.query.weight, cross)
    assert torch.equal(med.embeddings.word_embeddings.weight[-2:], extra_rows)
    ref = bert.bert.encoder.layer[1]
    layer = med.layers[1]
    assert torch.equal(layer.self_attn.key.weight, ref.attention.self.key.weight)
    assert torch.equal(layer.self_attn.norm.bias, ref.attention.output.LayerNorm.bias)
    assert torch.equal(layer.ffn.fc1.weight, ref.intermediate.dense.weight)
    assert torch.equal(layer.ffn.norm.weight, ref.output.LayerNorm.weight)
    for name, p in layer.self_attn_dec.named_parameters():  # the decoder starts as the encoder
        assert torch.equal(p, layer.self_attn.get_parameter(name)), name
    assert torch.equal(med.embeddings.position_embeddings.weight, bert.bert.embeddings.position_embeddings.weight)
    assert torch.equal(med.lm_head.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(med.lm_head.decoder.bias[: V - 2], bert.cls.predictions.bias)

    ids = torch.randint(0, V - 2, (B, T))
    am = torch.tensor([[1] * T, [1] * 4 + [0] * (T - 4)])
    with torch.no_grad():
        want_logits = bert(input_ids=ids, attention_mask=am).logits
        ours = med.lm_logits(med(ids, am, mode="text"))[..., : V - 2]
    torch.testing.assert_close(ours, want_logits, atol=1e-5, rtol=0)

    model = albef(seed=3)  # no decoder: nothing to copy into
    assert all(".cross_attn." in k for k in load_bert_weights(model, tmp_path))
    with pytest.raises(ValueError, match="model.text.layers"):
        load_bert_weights(build(layers=3), tmp_path)
