"""Tokenizers: the Q-Former's BERT tokenizer with [DEC], and small trained tokenizers for test/demo LLMs.

Real runs load bert-base-uncased and the LLM's own tokenizer from local HF folders. Tests and the
demo cannot download anything, so they train tiny tokenizers here with `tokenizers` and save them
in the same HF folder format, which then goes through exactly the loading path of a real run.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int,
                              out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Build an uncased BERT-style WordPiece tokenizer ([CLS] $A [SEP]) from texts; save it as an HF folder.

    The vocab is a pure function of the texts: BERT's special tokens ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
    [MASK]=4), every character seen (as a word start and as a "##" continuation, sorted), then whole words
    by frequency (ties alphabetical) up to `vocab_size` (exceeded only if the characters alone need more).
    A word outside the vocab splits into characters. The `tokenizers` WordPiece trainer is not used: its
    result changes from run to run (ties broken in hash order), which made runs irreproducible.
    [DEC] is not part of the folder: `load_qformer_tokenizer` adds it, exactly as for bert-base-uncased.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})  # each in both positions: any seen character is known
    base = BERT_SPECIALS + chars + ["##" + c for c in chars]
    taken = set(base)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in taken]
    vocab = base + words[:max(0, vocab_size - len(base))]
    wp = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    wp.normalizer = normalizer
    wp.pre_tokenizer = pre_tokenizer
    wp.decoder = decoders.WordPiece()
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    tok = BertTokenizerFast(tokenizer_object=wp, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    tok.save_pretrained(str(out_dir))
    return tok


def wordpiece_from_vocab(vocab_file: str | os.PathLike, out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """An uncased BERT tokenizer folder from a WordPiece `vocab.txt` (one token per line, bert-base-uncased's
    format). The vocab must hold BERT's special tokens; [DEC] is added at load time (`load_qformer_tokenizer`)."""
    path = Path(vocab_file)
    if not path.is_file():
        raise ValueError(f"{path}: no such vocab file (expected a WordPiece vocab.txt, one token per line)")
    tokens = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    missing = [t for t in BERT_SPECIALS if t not in tokens]
    if missing:
        raise ValueError(f"{path}: not a BERT WordPiece vocab (lacks {', '.join(missing)})")
    tok = BertTokenizerFast(vocab_file=str(path), do_lower_case=True, model_max_length=512)
    tok.save_pretrained(str(out_dir))
    return tok


def load_qformer_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a local BERT tokenizer folder and add [DEC] as bos_token (BLIP-2: 30522 + 1 = 30523 ids).

    The Q-Former's ITG loss replaces [CLS] by [DEC] (the bos id) to mark generation mode.
    """
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if DEC_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    elif tok.bos_token != DEC_TOKEN:
        tok.bos_token = DEC_TOKEN
    tok.padding_side = "right"
    tok.truncation_side = "right"
    return tok


def load_blip_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A local BERT tokenizer folder with [DEC] (bos) and then [ENC] added, as BLIP's (30522 + 2 = 30524 ids):
    the MED's decoder reads [DEC]-first text, its image-grounded encoder [ENC]-first text."""
    tok = load_qformer_tokenizer(path)
    if ENC_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tok


def _byte_level_bpe(texts: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return bpe


def _unigram_t5(texts: list[str], vocab_size: int) -> Tokenizer:
    # T5 ships a SentencePiece unigram model, with Metaspace ("▁") word boundaries. `tokenizers`'
    # UnigramTrainer is not a function of its input (four trainings on the same texts gave four vocabs),
    # and a tokenizer that changes between runs changes every T5 result downstream. So the pieces are
    # chosen here, deterministically: the characters (the fallback), then the most frequent words with
    # their "▁", each scored by its log frequency as a unigram model's pieces are.
    specials = ["<pad>", "</s>", "<unk>"]
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    words: Counter[str] = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    chars: Counter[str] = Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    total_chars, total_words = sum(chars.values()), sum(words.values())
    # A character costs far more than any word (log(1/total) - 10 < log of the rarest word), so Viterbi
    # splits into characters only what no word piece covers.
    pieces = [(c, math.log(n / total_chars) - 10.0) for c, n in sorted(chars.items())]
    room = max(0, vocab_size - len(specials) - len(pieces))
    ranked = sorted(((w, n) for w, n in words.items() if len(w) > 1), key=lambda x: (-x[1], x[0]))[:room]
    pieces += [(w, math.log(n / total_words)) for w, n in ranked]
    uni = Tokenizer(models.Unigram([(s, 0.0) for s in specials] + pieces, unk_id=2, byte_fallback=False))
    uni.normalizer = normalizer
    uni.pre_tokenizer = pre
    uni.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    uni.add_special_tokens(specials)
    return uni


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                        style: str = "opt") -> PreTrainedTokenizerFast:
    """Train a small LLM tokenizer in the conventions of a model family and save it as an HF folder.

    style="opt":   byte-level BPE; <s>=0 <pad>=1 </s>=2 <unk>=3; "</s>" is both bos (prepended) and eos.
    style="llama": byte-level BPE; <unk>=0 <s>=1 </s>=2 <pad>=3; "<s>" prepended.
    style="t5":    unigram (SentencePiece-free); <pad>=0 </s>=1 <unk>=2; "</s>" appended, no bos.
    """
    texts = list(texts)
    if style == "opt":
        tk = _byte_level_bpe(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>"])
        tk.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", tk.token_to_id("</s>"))])
        specials = dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    elif style == "llama":
        tk = _byte_level_bpe(texts, vocab_size, ["<unk>", "<s>", "</s>", "<pad>"])
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))])
        specials = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    elif style == "t5":
        tk = _unigram_t5(texts, vocab_size)
        tk.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tk.token_to_id("</s>"))])
        specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    else:
        raise ValueError(f"style must be one of opt | llama | t5, got {style!r}")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=2048, **specials)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok
