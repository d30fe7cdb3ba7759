"""Q-Former: the four call patterns, the ITG cache, masks' effects, LM head, BERT init, names."""
from __future__ import annotations

import pytest
import torch

from blip_train.models.hf_names import (QFORMER_LAYOUTS, qformer_from_bert, qformer_from_hf, qformer_keys_without_hf,
                                        qformer_to_bert, qformer_to_hf)
from blip_train.models.qformer import QFormer, load_bert_weights
from tests.helpers.tiny import tiny_bert_config, tiny_qformer_config

B, NQ, T, NIMG, WIDTH = 2, 4, 6, 5, 24


def build(seed: int = 0, **overrides) -> QFormer:
    torch.manual_seed(seed)
    return QFormer(tiny_qformer_config(**overrides), encoder_width=WIDTH, attention="sdpa").eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(query_embeds=torch.randn(B, NQ, 32, generator=g),
                input_ids=torch.randint(1, 120, (B, T), generator=g),
                attention_mask=torch.tensor([[1] * T, [1] * 3 + [0] * (T - 3)]),
                image_embeds=torch.randn(B, NIMG, WIDTH, generator=g))


def test_structure():
    qf = build()
    assert [layer.cross_attn is not None for layer in qf.layers] == [True, False]
    assert qf.layers[0].cross_attn.key.in_features == WIDTH
    assert qf.lm_head.decoder.weight is qf.embeddings.word_embeddings.weight
    for name, p in qf.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name


def test_call_patterns_shapes():
    qf, x = build(), inputs()
    q_only = qf(query_embeds=x["query_embeds"], image_embeds=x["image_embeds"])
    assert q_only.last_hidden_state.shape == (B, NQ, 32) and q_only.past_key_values is None
    t_only = qf(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
    assert t_only.last_hidden_state.shape == (B, T, 32)
    both = qf(**x, mask="bidirectional")
    assert both.last_hidden_state.shape == (B, NQ + T, 32)
    assert qf.lm_logits(t_only.last_hidden_state).shape == (B, T, 120)


def test_unimodal_equals_separate_passes():
    qf, x = build(), inputs()
    both = qf(**x, mask="unimodal").last_hidden_state
    q_only = qf(query_embeds=x["query_embeds"], image_embeds=x["image_embeds"]).last_hidden_state
    t_only = qf(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
    torch.testing.assert_close(both[:, :NQ], q_only, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[:, NQ:], t_only, atol=1e-5, rtol=0)


def test_bidirectional_mixes_and_ignores_padding():
    qf, x = build(), inputs()
    uni, bi = qf(**x, mask="unimodal").last_hidden_state, qf(**x, mask="bidirectional").last_hidden_state
    assert not torch.allclose(uni[:, :NQ], bi[:, :NQ])  # queries now see text
    changed = dict(x, input_ids=x["input_ids"].clone())
    changed["input_ids"][1, 3:] = 7  # only padding tokens of sample 1 change
    bi2 = qf(**changed, mask="bidirectional").last_hidden_state
    torch.testing.assert_close(bi2[1, : NQ + 3], bi[1, : NQ + 3], atol=1e-6, rtol=0)


def test_itg_cache_equals_full_causal_pass():
    qf, x = build(), inputs()
    full = qf(**x, mask="causal").last_hidden_state
    cached = qf(query_embeds=x["query_embeds"], image_embeds=x["image_embeds"], use_cache=True)
    assert len(cached.past_key_values) == 2 and cached.past_key_values[0][0].shape == (B, 4, NQ, 8)
    torch.testing.assert_close(cached.last_hidden_state, full[:, :NQ], atol=1e-5, rtol=0)
    text = qf(input_ids=x["input_ids"], attention_mask=x["attention_mask"], mask="causal",
              past_key_values=cached.past_key_values).last_hidden_state
    torch.testing.assert_close(text, full[:, NQ:], atol=1e-5, rtol=0)
    # causal: a later text token never changes an earlier position
    later = dict(x, input_ids=x["input_ids"].clone())
    later["input_ids"][:, -1] = 3
    torch.testing.assert_close(qf(**later, mask="causal").last_hidden_state[:, :-1], full[:, :-1], atol=1e-6, rtol=0)


def test_gradient_checkpointing_and_dropout():
    x = inputs()
    grads = []
    for ckpt in (False, True):
        qf = build(grad_checkpointing=ckpt).train()
        qf(**x, mask="causal").last_hidden_state.square().mean().backward()
        grads.append([p.grad.clone() for p in qf.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    qf = build(dropout=0.5).train()
    assert not torch.allclose(qf(**x).last_hidden_state, qf(**x).last_hidden_state)


def test_empty_text_row_is_finite():
    qf, x = build(), inputs()
    out = qf(input_ids=x["input_ids"], attention_mask=torch.zeros(B, T, dtype=torch.long))
    assert torch.isfinite(out.last_hidden_state).all()


def test_invalid_calls():
    qf, x = build(), inputs()
    with pytest.raises(ValueError, match="image_embeds"):
        qf(query_embeds=x["query_embeds"])
    with pytest.raises(ValueError, match="use_cache"):
        qf(**x, use_cache=True)
    with pytest.raises(ValueError, match="mask"):
        qf(**x, mask="prefix")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        qf(input_ids=torch.ones(1, 65, dtype=torch.long))


def test_load_bert_weights(tmp_path):
    from transformers import BertForMaskedLM, BertModel

    cfg = tiny_qformer_config()
    torch.manual_seed(5)
    bert = BertForMaskedLM(tiny_bert_config(cfg)).eval()  # vocab 119: no [DEC]
    with torch.no_grad():  # the Q-Former has no segments: make BERT's segment-0 embedding zero
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
    bert.save_pretrained(tmp_path)
    qf = build(seed=9)
    dec_row = qf.embeddings.word_embeddings.weight[-1].clone()
    left_random = load_bert_weights(qf, tmp_path)
    assert left_random and all(".cross_attn." in k for k in left_random)
    assert torch.equal(qf.embeddings.word_embeddings.weight[-1], dec_row)
    layer = qf.layers[0]
    assert torch.equal(layer.ffn_query.fc1.weight, layer.ffn.fc1.weight)
    ids = torch.randint(0, 119, (2, 7))
    am = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ours = qf(input_ids=ids, attention_mask=am).last_hidden_state
    with torch.no_grad():
        want = bert.bert(input_ids=ids, attention_mask=am).last_hidden_state
        want_logits = bert(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(qf.lm_logits(ours)[..., :119], want_logits, atol=1e-5, rtol=0)

    BertModel(tiny_bert_config(cfg, vocab_size=200)).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match="vocab"):
        load_bert_weights(build(), tmp_path / "big")


def test_bert_names_round_trip():
    sd = build().state_dict()
    bert = qformer_to_bert(sd)
    assert "bert.encoder.layer.0.crossattention.self.key.weight" in bert
    assert "bert.encoder.layer.1.output_query.LayerNorm.bias" in bert
    back = qformer_from_bert(bert)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("layout", list(QFORMER_LAYOUTS))
def test_hf_names_round_trip(layout):
    sd = build().state_dict()
    hf = qformer_to_hf(sd, layout)
    back = qformer_from_hf(hf, layout)
    absent = set(qformer_keys_without_hf(list(sd), layout))
    assert "lm_head.dense.weight" in absent
    assert set(back) == set(sd) - absent and all(torch.equal(back[k], sd[k]) for k in back)
    assert qformer_to_hf(back, layout).keys() == hf.keys()
    with pytest.raises(ValueError):
        qformer_from_hf({"bogus.weight": torch.zeros(1)}, layout)
