"""LLM-stage batches: exact label masks (queries/prompt/instruction/padding never counted), T5 split
bounds and seeding, instruction templates, the LLaMA pad-token fallback."""
from __future__ import annotations

import random

import pytest
import torch

from blip_train.data.collate import IGNORE_INDEX
from blip_train.data.llm_collate import (DecoderLMCollator, InstructCollator, T5PrefixCollator, load_llm_tokenizer,
                                         t5_split_point)
from blip_train.data.templates import Templates, choose_instruction, eval_instruction, load_templates
from blip_train.data.tokenizers import load_qformer_tokenizer, train_bpe_tokenizer, train_wordpiece_tokenizer

TEXTS = ["a photo of a red circle on the left", "a large blue square at the top", "what color is the circle?",
         "question: how many shapes are there? short answer: two", "a short caption: a green triangle"] * 6
IMG = torch.zeros(3, 4, 4)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    out = {}
    for style in ("opt", "llama", "t5"):
        train_bpe_tokenizer(TEXTS, 300, d / style, style=style)
        out[style] = load_llm_tokenizer(d / style)
    train_wordpiece_tokenizer(TEXTS, 120, d / "q")
    out["q"] = load_qformer_tokenizer(d / "q")
    return out


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def caption_samples():
    return [{"pixel_values": IMG, "caption": "A red circle on the left."},
            {"pixel_values": IMG + 1, "caption": "a blue square"}]


def test_decoder_collator_exact_rows(toks):
    opt = toks["opt"]
    batch = DecoderLMCollator(opt, prompt="a photo of", max_txt_len=16, eos_text="\n")(caption_samples())
    assert list(batch) == ["pixel_values", "llm_input_ids", "llm_attention_mask", "llm_labels"]
    head = [opt.bos_token_id] + enc(opt, "a photo of")
    bodies = [enc(opt, " a red circle on the left") + enc(opt, "\n"), enc(opt, " a blue square") + enc(opt, "\n")]
    width = len(head) + max(map(len, bodies))
    for i, body in enumerate(bodies):
        pad = width - len(head) - len(body)
        assert batch["llm_input_ids"][i].tolist() == head + body + [opt.pad_token_id] * pad
        assert batch["llm_attention_mask"][i].tolist() == [1] * (len(head) + len(body)) + [0] * pad
        assert batch["llm_labels"][i].tolist() == [IGNORE_INDEX] * len(head) + body + [IGNORE_INDEX] * pad
    assert opt.decode(bodies[1]) == " a blue square\n"
    assert torch.equal(batch["pixel_values"][1], IMG + 1)


def test_decoder_collator_truncates_text_not_end_marker(toks):
    opt = toks["opt"]
    batch = DecoderLMCollator(opt, max_txt_len=3, eos_text="\n")(caption_samples())
    labels = batch["llm_labels"][0]
    assert batch["llm_input_ids"][0, 0] == opt.bos_token_id and labels[0] == IGNORE_INDEX  # bos never a target
    target = labels[labels != IGNORE_INDEX].tolist()
    nl = enc(opt, "\n")
    assert len(target) == 3 and target[-len(nl):] == nl
    assert target[:-len(nl)] == enc(opt, "a red circle on the left")[:3 - len(nl)]  # no prompt: no leading space


def test_decoder_collator_eos_id_and_generation(toks):
    llama = toks["llama"]
    batch = DecoderLMCollator(llama, prompt="a photo of", eos_text=None)(caption_samples())
    labels = batch["llm_labels"][1]
    assert labels[labels != IGNORE_INDEX].tolist() == enc(llama, " a blue square") + [llama.eos_token_id]
    gen = DecoderLMCollator(llama, prompt="a photo of", generation=True)(caption_samples())
    head = [llama.bos_token_id] + enc(llama, "a photo of")
    assert "llm_labels" not in gen and gen["llm_input_ids"].tolist() == [head, head]
    assert gen["caption"] == ["A red circle on the left.", "a blue square"]  # metadata passed through


def test_llama_tokenizer_without_pad_uses_unk(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, 300, tmp_path, style="llama")
    tok.pad_token = None  # as Vicuna's tokenizer ships
    tok.save_pretrained(str(tmp_path))
    loaded = load_llm_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.unk_token_id and len(loaded) == len(tok)  # nothing added
    assert loaded.padding_side == "right"


def test_t5_split_point_bounds_and_seed():
    for n in (1, 2, 3, 7, 20):
        draws = [t5_split_point(n, random.Random(s)) for s in range(300)]
        assert min(draws) >= 1 and max(draws) <= max(1, n // 2)
        assert set(draws) == set(range(1, max(1, n // 2) + 1))  # every allowed point is drawn
    assert t5_split_point(0, random.Random(0)) == 0
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [t5_split_point(20, rng_a) for _ in range(50)] == [t5_split_point(20, rng_b) for _ in range(50)]


def test_t5_prefix_collator_rows(toks):
    t5 = toks["t5"]
    samples = [{"pixel_values": IMG, "caption": "a large blue square at the top and a red circle", "draw_seed": i}
               for i in range(40)]
    batch = T5PrefixCollator(t5, max_txt_len=64, seed=3)(samples)
    full = enc(t5, "a large blue square at the top and a red circle")
    n, eos, ks = len(full), t5.eos_token_id, set()
    for i in range(len(samples)):
        m = batch["llm_attention_mask"][i]
        e = batch["llm_input_ids"][i][m == 1].tolist()
        lab = batch["llm_labels"][i]
        d = lab[lab != IGNORE_INDEX].tolist()
        k = len(e) - 1
        assert 1 <= k <= n // 2 and e[-1] == eos and d[-1] == eos
        assert e[:-1] + d[:-1] == full  # prefix + suffix is the caption, nothing lost or repeated
        assert (batch["llm_input_ids"][i][m == 0] == t5.pad_token_id).all()
        assert (lab[len(d):] == IGNORE_INDEX).all()  # padding never a target
        ks.add(k)
    assert len(ks) > 3  # random per sample
    again = T5PrefixCollator(t5, max_txt_len=64, seed=3)(samples)
    other = T5PrefixCollator(t5, max_txt_len=64, seed=4)(samples)
    assert torch.equal(again["llm_input_ids"], batch["llm_input_ids"])
    assert not torch.equal(other["llm_input_ids"], batch["llm_input_ids"])


def test_text_draws_belong_to_the_sample_not_the_batch(toks):
    """A resumed run regroups samples into other batches, workers and ranks: each sample's split point
    and instruction template must depend only on its own draw_seed (and the run's seed)."""
    t5, q = toks["t5"], toks["q"]
    caption = "a large blue square at the top and a red circle"
    samples = [{"pixel_values": IMG, "caption": caption, "draw_seed": 100 + i} for i in range(12)]
    t5c = T5PrefixCollator(t5, max_txt_len=64, seed=3)
    together = t5c(samples)["llm_attention_mask"].sum(1).tolist()
    alone = [t5c([s])["llm_attention_mask"].sum(1).item() for s in reversed(samples)][::-1]
    assert together == alone and len(set(together)) > 2
    inst = InstructCollator(q, t5, decoder_only=False)
    vqa = [{"pixel_values": IMG, "task": "vqa", "question": "what color is it?", "answer": "red", "draw_seed": i}
           for i in range(12)]
    chosen = [inst.instruction(s) for s in vqa]
    assert chosen == [inst.instruction(s) for s in vqa] and len(set(chosen)) > 1
    assert InstructCollator(q, t5, decoder_only=False).instruction(vqa[0]) == chosen[0]  # a new process, too
    with pytest.raises(KeyError, match="draw_seed"):
        t5c([{"pixel_values": IMG, "caption": caption}])


def test_t5_prefix_collator_prompt_and_truncation(toks):
    t5 = toks["t5"]
    batch = T5PrefixCollator(t5, max_txt_len=5, prompt="a photo of", seed=0)([{"pixel_values": IMG, "draw_seed": 0,
                                                                               "caption": "a red circle on the left"}])
    prompt, full = enc(t5, "a photo of"), enc(t5, "a red circle on the left")[:4]
    e = batch["llm_input_ids"][0].tolist()
    d = batch["llm_labels"][0].tolist()
    assert e[:len(prompt)] == prompt and e[len(prompt):-1] + d[:-1] == full and len(d) <= 5
    gen = T5PrefixCollator(t5, prompt="a photo of", generation=True)([{"pixel_values": IMG, "caption": "x"}])
    assert gen["llm_input_ids"][0].tolist() == prompt + [t5.eos_token_id] and "llm_labels" not in gen


ONE = Templates(train={"vqa": ("Question: {} Short answer:",), "caption": ("A short caption:",)},
                eval={"vqa": "Q: {} A:"})


def instruct_samples():
    return [{"pixel_values": IMG, "task": "vqa", "question": "what color is the circle?", "answer": "red",
             "draw_seed": 0},
            {"pixel_values": IMG, "task": "caption", "question": "", "answer": "a large blue square at the top",
             "draw_seed": 1}]


def test_instruct_collator_decoder_only_rows(toks):
    opt, q = toks["opt"], toks["q"]
    batch = InstructCollator(q, opt, templates=ONE, max_prompt_len=64, max_txt_len=32)(instruct_samples())
    insts = ["Question: what color is the circle? Short answer:", "A short caption:"]
    want_q = q(insts, padding="longest", return_tensors="pt")
    assert batch["qformer_input_ids"].tolist() == want_q["input_ids"].tolist()
    assert batch["qformer_attention_mask"].tolist() == want_q["attention_mask"].tolist()
    heads = [[opt.bos_token_id] + enc(opt, s) for s in insts]
    bodies = [enc(opt, " red") + [opt.eos_token_id], enc(opt, " a large blue square at the top") + [opt.eos_token_id]]
    width = max(len(h) + len(b) for h, b in zip(heads, bodies))
    for i, (h, b) in enumerate(zip(heads, bodies)):
        pad = width - len(h) - len(b)
        assert batch["llm_input_ids"][i].tolist() == h + b + [opt.pad_token_id] * pad
        assert batch["llm_attention_mask"][i].tolist() == [1] * (len(h) + len(b)) + [0] * pad
        assert batch["llm_labels"][i].tolist() == [IGNORE_INDEX] * len(h) + b + [IGNORE_INDEX] * pad


def test_instruct_collator_t5_rows_and_limits(toks):
    t5, q = toks["t5"], toks["q"]
    batch = InstructCollator(q, t5, templates=ONE, max_prompt_len=4, max_txt_len=3, decoder_only=False,
                             max_qformer_len=5)(instruct_samples())
    assert batch["qformer_input_ids"].shape[1] == 5  # [CLS] ... [SEP] truncated to model.max_txt_len
    inst = enc(t5, "Question: what color is the circle? Short answer:")[-3:] + [t5.eos_token_id]
    assert batch["llm_input_ids"][0].tolist() == inst
    want = [enc(t5, "red")[:2] + [t5.eos_token_id], enc(t5, "a large blue square at the top")[:2] + [t5.eos_token_id]]
    for i, w in enumerate(want):
        row = batch["llm_labels"][i].tolist()
        assert row == w + [IGNORE_INDEX] * (len(row) - len(w))
    gen = InstructCollator(q, t5, templates=ONE, decoder_only=False, generation=True)(instruct_samples()[:1])
    assert gen["llm_input_ids"][0].tolist() == enc(t5, "Q: what color is the circle? A:") + [t5.eos_token_id]


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_long_instructions_keep_their_tail(toks, llm):
    """The question and the answer cue are at the end of every template: truncation cuts the beginning."""
    tok, q = toks[llm], toks["q"]
    question = "what color is the circle? " * 8 + "how many shapes are there?"
    sample = {"pixel_values": IMG, "task": "vqa", "question": question, "answer": "two", "draw_seed": 0}
    coll = InstructCollator(q, tok, templates=ONE, max_prompt_len=8, max_txt_len=4, decoder_only=llm == "opt",
                            max_qformer_len=10)
    batch = coll([sample])
    full = enc(tok, f"Question: {question} Short answer:")
    prompt = batch["llm_input_ids"][0].tolist()
    if llm == "opt":
        assert prompt[:9] == [tok.bos_token_id] + full[-8:]
    else:
        assert prompt == full[-7:] + [tok.eos_token_id]
    qids = batch["qformer_input_ids"][0].tolist()
    q_full = q(f"Question: {question} Short answer:")["input_ids"]
    assert len(qids) == 10 and qids == q_full[:1] + q_full[-9:]  # [CLS] + the tail, ending in [SEP]


def test_instruct_generation_left_pads(toks):
    opt, q = toks["opt"], toks["q"]
    gen = InstructCollator(q, opt, templates=ONE, generation=True)(instruct_samples())
    mask = gen["llm_attention_mask"]
    assert "llm_labels" not in gen and (mask[:, -1] == 1).all() and (mask[1, 0] == 0 or mask[0, 0] == 0)
    assert gen["answer"] == ["red", "a large blue square at the top"]


def test_templates_choice_is_seeded_and_covers_all():
    t = load_templates()
    assert {"caption", "vqa", "vqa_short", "conversation", "visual_dialog"} <= set(t.tasks)
    draws = [choose_instruction("vqa", "what is it?", random.Random(i)) for i in range(400)]
    assert len(set(draws)) == len(t.train["vqa"])  # every phrasing is used
    assert all("what is it?" in d for d in draws)
    a, b = random.Random(7), random.Random(7)
    assert [choose_instruction("caption", "", a) for _ in range(20)] == [choose_instruction("caption", "", b)
                                                                         for _ in range(20)]
    assert eval_instruction("vqa_short", "how many?") == "Question: how many? Short answer:"
    with pytest.raises(KeyError, match="no instruction templates for task 'ocr'"):
        choose_instruction("ocr", "q", random.Random(0))
    with pytest.raises(ValueError, match="needs a question"):
        choose_instruction("vqa", "  ", random.Random(0))


def test_t5_full_caption_target_for_evaluation(toks):
    t5 = toks["t5"]
    batch = T5PrefixCollator(t5, prefix_lm=False)([{"pixel_values": IMG, "caption": "A red circle."}])
    assert batch["llm_input_ids"][0].tolist() == [t5.eos_token_id]  # queries + </s> only
    assert batch["llm_labels"][0].tolist() == enc(t5, "a red circle") + [t5.eos_token_id]
