"""BLIP's VQA model (model.objective=vqa) on one rank: the weighted answer loss against a direct float64
computation, what trains, ranking against brute force, the collator's answer weights, init_from's answer decoder
and the config's refusals."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from blip_train.models.blip import BlipPretrain
from blip_train.models.blip_losses import answer_log_likelihood, weighted_answer_loss
from tests.unit.test_blip_model import TOKENS, blip_config

B, TQ, TA = 3, 6, 4


def vqa_model(seed: int = 0) -> BlipPretrain:
    torch.manual_seed(seed)
    return BlipPretrain(replace(blip_config(), objective="vqa"), TOKENS)


def vqa_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(6, 120, (B, TQ), generator=g)
    q[:, 0] = TOKENS.enc
    qmask = torch.ones_like(q)
    qmask[1, 4:] = 0
    a = torch.randint(6, 120, (5, TA), generator=g)
    a[:, 0], a[:, -1] = TOKENS.dec, TOKENS.sep
    amask = torch.ones_like(a)
    a[2, 2], a[2, 3:], amask[2, 3:] = TOKENS.sep, TOKENS.pad, 0
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=g), "question_ids": q, "question_mask": qmask,
            "answer_ids": a, "answer_mask": amask, "answer_labels": a.masked_fill(amask == 0, -100),
            "answer_owner": torch.tensor([0, 0, 1, 2, 2]), "answer_weight": torch.tensor([0.6, 0.4, 0.2, 0.5, 0.5])}


def test_weighted_answer_loss_is_the_definition_in_float64():
    """sum over answers of weight x (sum over target tokens of the label-smoothed CE) / questions."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 11, generator=g)
    labels = torch.randint(0, 11, (4, 5), generator=g)
    labels[1, 3:] = -100
    weights = torch.tensor([0.3, 0.7, 1.0, 0.2])
    eps, want = 0.1, 0.0
    for n in range(4):
        seq = 0.0
        for t in range(4):  # position t predicts token t + 1
            y = int(labels[n, t + 1])
            if y == -100:
                continue
            logp = logits[n, t].double().log_softmax(-1)
            seq += -(1 - eps) * logp[y].item() - eps * logp.mean().item()
        want += float(weights[n]) * seq
    assert weighted_answer_loss(logits, labels, weights, num_questions=3).item() == pytest.approx(want / 3, rel=1e-6)
    ll = answer_log_likelihood(logits, labels)
    direct = sum(logits[0, t].double().log_softmax(-1)[int(labels[0, t + 1])].item() for t in range(4))
    assert ll[0].item() == pytest.approx(direct, rel=1e-6)


def test_vqa_trains_the_question_encoder_and_an_untied_answer_decoder():
    model = vqa_model()
    assert not hasattr(model, "visual_encoder_m") and model.queue is None  # no momentum model
    # Untied: the answer decoder's tensors are its own, though initialised alike.
    assert model.text_decoder.embeddings.word_embeddings.weight is not model.text.embeddings.word_embeddings.weight
    out = model(vqa_batch())
    assert set(out) == {"loss", "loss_vqa"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads <= trainable
    for name in ("visual_encoder.blocks.0.attn.qkv.weight", "text.layers.0.self_attn.query.weight",
                 "text.layers.1.cross_attn.query.weight", "text_decoder.layers.0.self_attn_dec.query.weight",
                 "text_decoder.layers.1.cross_attn.key.weight", "text_decoder.lm_head.dense.weight"):
        assert name in grads, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "text_decoder.layers.0.self_attn.query.weight" in frozen and "text.layers.0.self_attn_dec.query.weight" in frozen
    assert {"temp", "itm_head.weight", "vision_proj.weight", "text.lm_head.dense.weight"} <= frozen
    # The answer decoder cross-attends to the question's states (the MED's width), not to the image.
    assert model.text_decoder.layers[0].cross_attn.key.weight.shape[1] == model.text.cfg.hidden_size


def test_loss_weights_each_answer_and_divides_by_questions():
    model = vqa_model().eval()
    batch = vqa_batch()
    base = model(batch)["loss"]
    doubled = model({**batch, "answer_weight": 2 * batch["answer_weight"]})["loss"]
    assert doubled.item() == pytest.approx(2 * base.item(), rel=1e-5)
    only_first = model({**batch, "answer_weight": torch.tensor([1.0, 0, 0, 0, 0])})["loss"]
    one = {k: batch[k][:1] for k in ("pixel_values", "question_ids", "question_mask")}
    alone = model({**one, **{k: batch[k][:1] for k in ("answer_ids", "answer_mask", "answer_labels")},
                   "answer_owner": torch.tensor([0]), "answer_weight": torch.tensor([1.0])})["loss"]
    assert only_first.item() == pytest.approx(alone.item() / 3, rel=1e-5)  # B = 3 questions in the batch


def test_ranking_returns_the_most_likely_candidate():
    """With k = every candidate the choice is the argmax of the full log-likelihood, computed here one candidate at
    a time; with a smaller k, the best of the k likeliest first tokens."""
    model = vqa_model(3).eval()
    batch = vqa_batch(3)
    pixels, q, qmask = batch["pixel_values"], batch["question_ids"], batch["question_mask"]
    cands, cmask = batch["answer_ids"], batch["answer_mask"]
    with torch.no_grad():
        states = model.text(q, qmask, image_embeds=model.visual_encoder(pixels), mode="multimodal")
        scores = torch.zeros(B, cands.shape[0])
        for c in range(cands.shape[0]):
            ids, mask = cands[c:c + 1].expand(B, -1), cmask[c:c + 1].expand(B, -1)
            hidden = model.text_decoder(ids, mask, image_embeds=states, image_mask=qmask, mode="decoder")
            scores[:, c] = answer_log_likelihood(model.text_decoder.lm_logits(hidden), ids.masked_fill(mask == 0, -100))
        first = model.text_decoder.lm_logits(model.text_decoder(
            cands[:1, :1].expand(B, 1), None, image_embeds=states, image_mask=qmask, mode="decoder"))[:, 0]
    best = model.rank_answers(pixels, q, qmask, cands, cmask, k=cands.shape[0])
    assert torch.equal(best, scores.argmax(1))
    top2 = first.log_softmax(-1)[:, cands[:, 1]].topk(2, dim=1).indices  # (B, 2)
    best2 = model.rank_answers(pixels, q, qmask, cands, cmask, k=2)
    assert torch.equal(best2, top2.gather(1, scores.gather(1, top2).argmax(1, keepdim=True)).squeeze(1))
    ids = model.generate(pixels, question_ids=q, question_mask=qmask, answer_ids=cands, answer_mask=cmask, k_test=5)
    assert torch.equal(ids, cands[best, 1:])


def test_answers_are_generated_by_the_answer_decoder():
    model = vqa_model().eval()
    batch = vqa_batch()
    kw = {"question_ids": batch["question_ids"], "question_mask": batch["question_mask"], "max_new_tokens": 4}
    greedy = model.generate(batch["pixel_values"], **kw)
    assert greedy.shape == (B, 4)
    with torch.no_grad():
        model.text_decoder.lm_head.decoder.bias[TOKENS.sep] += 100.0  # the answer decoder, not the MED, writes
    beams = model.generate(batch["pixel_values"], **kw, min_new_tokens=1, num_beams=2)
    assert (beams[:, 1] == TOKENS.sep).all() and (beams[:, 2:] == TOKENS.pad).all()  # [SEP] once allowed
    with pytest.raises(ValueError, match="does not train the decoder"):
        model.generate_captions(batch["pixel_values"], TOKENS.dec, TOKENS.sep, TOKENS.pad)
    with pytest.raises(ValueError, match="does not train the ITC / ITM heads"):
        model.encode_image(batch["pixel_values"])


def test_collator_weights_answers_by_annotator_share(tmp_path):
    from blip_train.data.collate import BlipVQACollator, pre_question, weighted_answers
    from tests.helpers.tiny_run import make_tiny_assets
    from blip_train.data.tokenizers import load_blip_tokenizer

    ten = {"question": "What colour?", "answer": "red", "answers": ["red"] * 6 + ["dark red"] * 3 + ["blue"]}
    assert weighted_answers(ten) == [("red", 0.6), ("dark red", 0.3), ("blue", 0.1)]
    assert weighted_answers({"question": "q", "answer": "two", "answers": ["two"]}) == [("two", 0.2)]
    with pytest.raises(ValueError, match="dataset 'vg'"):
        weighted_answers({"question": "q", "answer": "", "answers": [], "dataset": "vg"})
    assert pre_question("What's on the (left) table?!") == "what's on the left table?"

    tok = load_blip_tokenizer(make_tiny_assets(tmp_path)["tokenizer"])
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    samples = [dict(ten, pixel_values=image), {"question": "how many", "answer": "two", "answers": ["two"],
                                               "pixel_values": image}]
    batch = BlipVQACollator(tok, 12, 6)(samples)
    assert (batch["question_ids"][:, 0] == tok.convert_tokens_to_ids("[ENC]")).all()
    assert (batch["answer_ids"][:, 0] == tok.convert_tokens_to_ids("[DEC]")).all()
    assert batch["answer_owner"].tolist() == [0, 0, 0, 1]
    assert batch["answer_weight"].tolist() == pytest.approx([0.6, 0.3, 0.1, 0.2])
    assert math.isclose(batch["answer_weight"][:3].sum().item(), 1.0, rel_tol=1e-6)
    assert (batch["answer_labels"][batch["answer_mask"] == 0] == -100).all()
    assert set(BlipVQACollator(tok, 12, 6, generation=True)(samples)) == {"pixel_values", "question_ids",
                                                                            "question_mask"}
    with pytest.raises(ValueError, match="dataset 'coco'"):
        BlipVQACollator(tok)([{"question": " ", "answer": "x", "answers": [], "dataset": "coco",
                               "pixel_values": image}])


def test_init_from_starts_the_answer_decoder_as_the_pretrained_med(tmp_path):
    from safetensors.torch import save_file

    from blip_train.training.weights import init_blip_from_

    pretrained = BlipPretrain(blip_config(), TOKENS)
    state = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    state.update({n: b for n, b in pretrained.named_buffers() if b is not None})
    save_file(state, str(tmp_path / "pre.safetensors"))
    model = vqa_model(7)
    report = init_blip_from_(model, tmp_path / "pre.safetensors")
    assert report["momentum"] == "none" and report["queue"] == "none" and report["answer_decoder"]
    for name, p in model.text_decoder.named_parameters():
        assert torch.equal(p, state["text." + name]), name
    for name, p in model.text.named_parameters():
        assert torch.equal(p, state["text." + name]), name
    # A VQA run's own checkpoint keeps its answer decoder (no copy from the MED).
    with torch.no_grad():
        model.text_decoder.layers[0].ffn.fc1.weight.add_(1.0)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_file(trained, str(tmp_path / "vqa.safetensors"))
    again = vqa_model(8)
    assert init_blip_from_(again, tmp_path / "vqa.safetensors")["answer_decoder"] == []
    assert torch.equal(again.text_decoder.layers[0].ffn.fc1.weight, trained["text_decoder.layers.0.ffn.fc1.weight"])


def test_config_refuses_what_a_vqa_run_cannot_do():
    from blip_train.config import ConfigError, ExperimentConfig, blip_task_refusal, validate_config

    assert blip_task_refusal("vqa", "vqa") == "" and "use --task vqa" in blip_task_refusal("vqa", "caption")
    assert "use --task retrieval or --task caption" in blip_task_refusal("pretrain", "vqa")
    base = ExperimentConfig(model=replace(blip_config(), objective="vqa"))
    cfg = replace(base, data=replace(base.data, image_size=32))
    with pytest.raises(ConfigError, match="eval.task: caption"):
        validate_config(replace(cfg, eval=replace(cfg.eval, task="caption")))
    with pytest.raises(ConfigError, match="eval.answer_list"):
        validate_config(replace(cfg, model=blip_config(), eval=replace(cfg.eval, answer_list="a.json")))
