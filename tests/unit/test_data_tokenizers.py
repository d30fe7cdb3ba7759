"""Tokenizers trained offline and saved as HF folders, loaded back through AutoTokenizer."""
from __future__ import annotations

from transformers import AutoTokenizer

from blip_train.data.tokenizers import load_qformer_tokenizer, train_bpe_tokenizer, train_wordpiece_tokenizer

TEXTS = ["a red circle on the left", "what color is the square?", "a small blue triangle at the top",
         "describe the image briefly.", "there is a large green square in the middle"] * 8


def test_qformer_tokenizer_adds_dec_once(tmp_path):
    train_wordpiece_tokenizer(TEXTS, 200, tmp_path)
    base = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    tok = load_qformer_tokenizer(tmp_path)
    assert len(tok) == len(base) + 1 and tok.bos_token == "[DEC]" and tok.bos_token_id == len(base)
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    ids = tok("A Red circle").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"
    # Saved with [DEC] (as a checkpoint's tokenizer would be): loading again adds nothing.
    tok.save_pretrained(str(tmp_path / "with_dec"))
    again = load_qformer_tokenizer(tmp_path / "with_dec")
    assert len(again) == len(tok) and again.bos_token_id == tok.bos_token_id


def test_llm_tokenizer_styles(tmp_path):
    expect = {"opt": dict(pad=1, eos=2, bos=2, unk=3, first=2, last=None),
              "llama": dict(pad=3, eos=2, bos=1, unk=0, first=1, last=None),
              "t5": dict(pad=0, eos=1, bos=None, unk=2, first=None, last=1)}
    for style, e in expect.items():
        train_bpe_tokenizer(TEXTS, 300, tmp_path / style, style=style)
        tok = AutoTokenizer.from_pretrained(str(tmp_path / style), local_files_only=True)
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == \
            (e["pad"], e["eos"], e["bos"], e["unk"]), style
        ids = tok("a red circle").input_ids
        if e["first"] is not None:
            assert ids[0] == e["first"] and ids[-1] != tok.eos_token_id, style
        if e["last"] is not None:
            assert ids[-1] == e["last"], style
        assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle", style


def test_tokenizers_are_a_function_of_their_texts(tmp_path):
    """The same texts give the same vocab, every time: tests and the demo rebuild their tokenizers, and a
    tokenizer that changes between runs changes every result downstream."""
    from blip_train.data.synthetic import make_sample

    texts = [c for i in range(120) for c in make_sample(i, seed=0, image_size=16)["captions"]]
    for k in range(3):
        train_wordpiece_tokenizer(texts, 60, tmp_path / f"wp{k}")
        train_bpe_tokenizer(texts, 300, tmp_path / f"bpe{k}", style="opt")
        train_bpe_tokenizer(texts, 300, tmp_path / f"t5{k}", style="t5")  # unigram: trained by us, not tokenizers
    for kind in ("wp", "bpe", "t5"):
        files = [(tmp_path / f"{kind}{k}" / "tokenizer.json").read_text() for k in range(3)]
        assert files[0] == files[1] == files[2], kind
    tok = load_qformer_tokenizer(tmp_path / "wp0")
    assert len(tok) - 1 >= 60  # the characters, then the most frequent words up to the size asked for
    assert tok.unk_token_id not in tok(texts[0]).input_ids
