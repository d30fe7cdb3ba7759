#!/usr/bin/env python
"""Write the Q-Former's BERT tokenizer folder (what model.qformer.tokenizer points at).

    python tools/make_qformer_tokenizer.py --vocab bert-base-uncased/vocab.txt --out weights/qformer_tokenizer
    python tools/make_qformer_tokenizer.py --from-text my_data/mds/train --vocab-size 30522 --out weights/qformer_tok

--vocab: bert-base-uncased's vocab.txt (the BLIP-2 Q-Former is initialised from bert-base-uncased, so
use its vocab with model.qformer.bert_init). --from-text: train an uncased WordPiece vocab on the
captions and questions of an MDS split, or on a text file (one text per line), for a Q-Former trained
from scratch. A downloaded bert-base-uncased folder can also be used as it is: set
model.qformer.tokenizer to it. [DEC] is added when the tokenizer loads (30522 + 1 = 30523 ids).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import run_tool

from blip_train.data.tokenizers import load_qformer_tokenizer, train_wordpiece_tokenizer, wordpiece_from_vocab


def read_texts(path: Path) -> list[str]:
    """Captions and questions of an MDS split, or the lines of a text file."""
    if path.is_dir():
        from streaming import LocalDataset

        from blip_train.data.schema import verify_split
        verify_split(path)
        ds = LocalDataset(str(path))
        rows = (ds[i] for i in range(len(ds)))
        return [t for r in rows for t in (r["caption"], *r["captions"], r["question"]) if t]
    if not path.is_file():
        raise ValueError(f"{path}: no such MDS split or text file")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vocab", help="a WordPiece vocab.txt (bert-base-uncased's)")
    src.add_argument("--from-text", help="an MDS split, or a text file with one text per line, to train a vocab on")
    p.add_argument("--vocab-size", type=int, default=30522, help="vocab size for --from-text (default 30522)")
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.vocab:
        wordpiece_from_vocab(args.vocab, tmp)
    else:
        texts = read_texts(Path(args.from_text))
        if not texts:
            raise ValueError(f"{args.from_text}: no texts to train on")
        print(f"make_qformer_tokenizer: training a {args.vocab_size}-token WordPiece vocab on {len(texts)} texts",
              flush=True)
        train_wordpiece_tokenizer(texts, args.vocab_size, tmp)
    n = len(load_qformer_tokenizer(tmp))  # loads as training will, [DEC] included
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"make_qformer_tokenizer: wrote {out} ({n} tokens with [DEC]); set model.qformer.tokenizer: {out} and "
          f"model.qformer.vocab_size >= {n}")
    print(json.dumps({"out": str(out), "tokens": n}))
    return 0


if __name__ == "__main__":
    run_tool(main)
