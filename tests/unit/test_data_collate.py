"""Caption cleaning and the stage-1 batch contract."""
from __future__ import annotations

import pytest
import torch

from blip_train.data.collate import IGNORE_INDEX, Stage1Collator, collate_samples, pre_caption
from blip_train.data.tokenizers import load_qformer_tokenizer, train_wordpiece_tokenizer


def test_pre_caption():
    assert pre_caption("  A Red  circle; on the LEFT!!  ") == "a red circle on the left"
    assert pre_caption('A "quoted" (thing): yes, it\'s 2-sided?') == "a quoted thing yes, it's 2-sided?"
    assert pre_caption("one two three four", max_words=2) == "one two"


@pytest.fixture(scope="module")
def qtok(tmp_path_factory):
    d = tmp_path_factory.mktemp("qtok")
    train_wordpiece_tokenizer(["a red circle on the left", "a small blue square at the top"] * 5, 100, d)
    return load_qformer_tokenizer(d)


def test_stage1_collator_exact_contract(qtok):
    samples = [{"pixel_values": torch.randn(3, 8, 8), "caption": "A red circle on the left.", "image_id": 7},
               {"pixel_values": torch.randn(3, 8, 8), "caption": "A square!", "image_id": 9}]
    batch = Stage1Collator(qtok, max_txt_len=6)(samples)
    assert list(batch) == ["pixel_values", "text_ids", "text_mask", "itg_input_ids", "itg_labels", "image_ids"]
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (2, 3, 8, 8)
    assert torch.equal(batch["pixel_values"][1], samples[1]["pixel_values"])
    for key in ("text_ids", "text_mask", "itg_input_ids", "itg_labels", "image_ids"):
        assert batch[key].dtype == torch.long, key
    cls, sep, pad, dec = qtok.cls_token_id, qtok.sep_token_id, qtok.pad_token_id, qtok.bos_token_id
    a = qtok("a red circle on").input_ids[1:-1]  # truncated to 6 with [CLS] and [SEP]
    b = qtok("a square").input_ids[1:-1]
    assert batch["text_ids"].tolist() == [[cls, *a, sep], [cls, *b, sep] + [pad] * (4 - len(b))]
    assert batch["text_mask"].tolist() == [[1] * 6, [1] * (2 + len(b)) + [0] * (4 - len(b))]
    assert batch["itg_input_ids"].tolist() == [[dec, *a, sep], [dec, *b, sep] + [pad] * (4 - len(b))]
    assert batch["itg_labels"].tolist() == [[dec, *a, sep], [dec, *b, sep] + [IGNORE_INDEX] * (4 - len(b))]
    assert batch["image_ids"].tolist() == [7, 9]


def test_stage1_collator_needs_dec(tmp_path):
    from transformers import AutoTokenizer
    train_wordpiece_tokenizer(["a b c"] * 3, 50, tmp_path)
    with pytest.raises(ValueError, match=r"\[DEC\]"):
        Stage1Collator(AutoTokenizer.from_pretrained(str(tmp_path)), 8)


def test_collate_samples_keeps_lists():
    s = {"pixel_values": torch.zeros(3, 4, 4), "question": "q", "answers": ["a", "b"], "question_id": 3}
    out = collate_samples([s, dict(s, answers=["c"], question_id=4)])
    assert out["pixel_values"].shape == (2, 3, 4, 4) and out["question_id"].tolist() == [3, 4]
    assert out["answers"] == [["a", "b"], ["c"]] and out["question"] == ["q", "q"]


@pytest.fixture(scope="module")
def llm_toks(tmp_path_factory):
    from blip_train.data.tokenizers import train_bpe_tokenizer
    texts = ["a photo of a red circle on the left", "what color is it? red", "a blue square"] * 5
    d = tmp_path_factory.mktemp("llm")
    return {style: train_bpe_tokenizer(texts, 300, d / style, style=style) for style in ("opt", "llama", "t5")}


def _samples():
    return [{"pixel_values": torch.zeros(3, 4, 4), "caption": "A red circle.", "question": "what color is it?",
             "answer": "red"},
            {"pixel_values": torch.zeros(3, 4, 4), "caption": "a blue square on the left", "question": "what?",
             "answer": "a blue square"}]




def test_blip_collator_with_a_caption_prompt(tmp_path):
    """BLIP's captioning fine-tuning: every text is prompt + caption; the decoder reads [DEC] and the prompt
    but its labels start after them (-100), so only the caption is a target. [ENC] opens the ITM input."""
    from blip_train.data.collate import BlipCollator
    from blip_train.data.tokenizers import DEC_TOKEN, ENC_TOKEN, load_blip_tokenizer
    train_wordpiece_tokenizer(["a picture of a red circle on the left", "a small blue square"] * 5, 100, tmp_path)
    tok = load_blip_tokenizer(tmp_path)
    dec, enc = tok.convert_tokens_to_ids(DEC_TOKEN), tok.convert_tokens_to_ids(ENC_TOKEN)
    samples = [{"pixel_values": torch.zeros(3, 8, 8), "caption": "A red circle.", "image_id": 1},
               {"pixel_values": torch.zeros(3, 8, 8), "caption": "A square", "image_id": 2}]
    plain = BlipCollator(tok, max_txt_len=12)(samples)
    batch = BlipCollator(tok, max_txt_len=12, prompt="a picture of ")(samples)
    prompt = tok("a picture of", add_special_tokens=False).input_ids
    caption = tok("a red circle", add_special_tokens=False).input_ids
    assert batch["text_ids"][0].tolist()[:len(prompt) + len(caption) + 2] == \
        [tok.cls_token_id, *prompt, *caption, tok.sep_token_id]
    assert batch["itg_input_ids"][0, 0] == dec and batch["itm_input_ids"][0, 0] == enc
    n = 1 + len(prompt)
    assert (batch["itg_labels"][:, :n] == IGNORE_INDEX).all()
    assert batch["itg_labels"][0, n:n + len(caption) + 1].tolist() == [*caption, tok.sep_token_id]
    # Without a prompt only [DEC]'s label would be ignored by the shift, and nothing is masked.
    assert plain["itg_labels"][0, 1:1 + len(caption)].tolist() == caption
