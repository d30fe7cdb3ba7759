"""The demo's tiny frozen LLMs: tokenizers trained and language models briefly pretrained on the
synthetic TRAIN texts, saved as HF folders (weights + tokenizer) like real OPT / Vicuna / FlanT5.

A frozen random LLM can hardly be steered by a soft prompt; real BLIP-2 relies on LLMs that already
know the language it asks them to produce, and that use what precedes a text (a document's context).
So each tiny LLM first learns, on the train split only (never val), its captions and its
question/answer pairs in the instruction formats of `data/templates.py`, most of them preceded by
context: a caption of the same image (whole, or only its content words), placed where the query
tokens will sit (before bos / at the start of the encoder input) and never a target. That is the
in-context reading the soft prompt relies on: a tiny LM trained on captions alone ignores whatever
precedes them, and one that never has to read answers from context answers from its prior (measured
on the demo data: VQA exact match with a true caption as context 0.45 → 0.73 with this mixture).
The stages then load the LLMs with `from_pretrained`, exactly as a real run does.

- opt   (decoder-only, OPT conventions): captions end with "\\n" as BLIP-2 stage 2 trains OPT;
        instruction + answer end with </s>.
- llama (decoder-only, LLaMA conventions; pad falls back to unk at load time, as with Vicuna).
- t5    (encoder-decoder, FlanT5 conventions: gated-GELU, untied head): a prefix LM on captions
        (encoder: the first k tokens, k uniform in [0, n // 2]; decoder: the rest), and
        instruction → answer.

    python -m blip_train.demo.llms --train runs/demo/data/train --out runs/demo/assets
"""
from __future__ import annotations

import argparse
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from streaming import StreamingDataset
from torch import nn

from blip_train.data.collate import IGNORE_INDEX, pre_caption
from blip_train.data.templates import choose_instruction
from blip_train.data.tokenizers import train_bpe_tokenizer

KINDS = ("opt", "llama", "t5")
VOCAB = {"opt": 512, "llama": 512, "t5": 384}
"""Tokenizer sizes: byte-level BPE needs 256 bytes + merges; the synthetic language has ~80 words."""


@dataclass
class DemoTexts:
    captions: list[tuple[str, str]]
    """(context, caption): every caption phrasing of every train sample, `pre_caption`-cleaned as the
    stage-2 collators do, with another phrasing of the same image as its possible context."""
    instructions: list[tuple[str, str, str]]
    """(context, instruction, answer): each train sample under a few templates of its task."""


STOPWORDS = frozenset("a an the of on at in near is are there and to with this that it its".split())
"""English function words: what remains of a caption is its content (a compact context)."""


def _content_words(caption: str) -> str:
    return " ".join(w for w in caption.split() if w not in STOPWORDS)


def read_demo_texts(train_split: str, seed: int = 0, phrasings_per_sample: int = 3) -> DemoTexts:
    """The train split's texts (captions; instructions with answers, as InstructCollator forms them)."""
    ds = StreamingDataset(local=train_split, shuffle=False, batch_size=1)
    rng = random.Random(seed)
    rows = [ds[i] for i in range(len(ds))]
    captions, pairs = [], []
    for row in rows:
        phrasings = [pre_caption(c) for c in (row["captions"] or [row["caption"]])]
        # Context: another phrasing of the same image, whole or as its content words.
        contexts = phrasings + [_content_words(c) for c in phrasings]
        captions.extend((rng.choice(contexts), c) for c in phrasings)
        answer = row["answer"] or row["caption"]
        for _ in range(phrasings_per_sample):
            pairs.append((rng.choice(contexts), choose_instruction(row["task"] or "caption", row["question"], rng),
                          answer.strip()))
    return DemoTexts(captions=captions, instructions=pairs)


def _build_model(kind: str, tok) -> nn.Module:
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, OPTConfig,
                              T5Config)

    v = len(tok)
    if kind == "opt":
        cfg = OPTConfig(vocab_size=v, hidden_size=128, num_hidden_layers=3, ffn_dim=512, num_attention_heads=4,
                        max_position_embeddings=128, word_embed_proj_dim=128, dropout=0.0, attention_dropout=0.0,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return AutoModelForCausalLM.from_config(cfg)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=v, hidden_size=128, num_hidden_layers=3, intermediate_size=384,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return AutoModelForCausalLM.from_config(cfg)
    cfg = T5Config(vocab_size=v, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    return AutoModelForSeq2SeqLM.from_config(cfg)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


CONTEXT_PROBABILITY = {"caption": 0.75, "instruction": 1.0}
"""How often an example is preceded by its image's context. Answers are image facts, so an instruction
always has context (the LM learns to read answers there); some captions are unconditional text."""


def _context(tok, context: str, rng: random.Random, kind: str) -> list[int]:
    # Another caption of the same image first, where the queries will be.
    return _ids(tok, context) if rng.random() < CONTEXT_PROBABILITY[kind] else []


def _decoder_examples(kind: str, tok, texts: DemoTexts, rng: random.Random) -> list[tuple[list[int], int]]:
    """(ids, start of the text): [context] bos caption end / [context] bos instruction answer eos, the
    collators' layout after the query positions; the context is never a target."""
    bos, eos = [tok.bos_token_id], [tok.eos_token_id]
    end = _ids(tok, "\n") if kind == "opt" else eos
    out = []
    for ctx, cap in texts.captions:
        c = _context(tok, ctx, rng, "caption")
        out.append((c + bos + _ids(tok, cap) + end, len(c)))
    for ctx, inst, ans in texts.instructions:
        c = _context(tok, ctx, rng, "instruction")
        out.append((c + bos + _ids(tok, inst) + _ids(tok, " " + ans) + eos, len(c)))
    return out


def _t5_examples(tok, texts: DemoTexts, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """(encoder ids, decoder ids): [context] caption prefix → rest (k in [0, n // 2]),
    [context] instruction → answer."""
    eos, out = tok.eos_token_id, []
    for ctx, cap in texts.captions:
        ids = _ids(tok, cap)
        k = rng.randint(0, len(ids) // 2)
        out.append((_context(tok, ctx, rng, "caption") + ids[:k] + [eos], ids[k:] + [eos]))
    for ctx, inst, ans in texts.instructions:
        out.append((_context(tok, ctx, rng, "instruction") + _ids(tok, inst) + [eos], _ids(tok, ans) + [eos]))
    return out


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)  # (B, T)


def _lm_loss(kind: str, model: nn.Module, batch: list, pad_id: int) -> torch.Tensor:
    if kind == "t5":
        enc = _pad([e for e, _ in batch], pad_id)
        labels = _pad([d for _, d in batch], IGNORE_INDEX)
        return model(input_ids=enc, attention_mask=(enc != pad_id).long(), labels=labels).loss
    ids = _pad([s for s, _ in batch], pad_id)
    mask = _pad([[1] * len(s) for s, _ in batch], 0)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for row, (_, start) in enumerate(batch):
        labels[row, :start + 1] = IGNORE_INDEX  # context and bos are given, never predicted
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def pretrain_llm(kind: str, texts: DemoTexts, out_dir: Path, steps: int = 400, batch_size: int = 64,
                 lr: float = 3e-3, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Train the tokenizer and the tiny `kind` LM on `texts`; save both to out_dir (an HF folder)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    corpus = [c for _, c in texts.captions] + [f"{i} {a}" for _, i, a in texts.instructions]
    tmp = out_dir.with_name(out_dir.name + ".tmp")  # renamed when complete: a killed run leaves no half folder
    shutil.rmtree(tmp, ignore_errors=True)
    tok = train_bpe_tokenizer(corpus, VOCAB[kind], tmp, style=kind)
    examples = _t5_examples(tok, texts, rng) if kind == "t5" else _decoder_examples(kind, tok, texts, rng)
    model = _build_model(kind, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    t0, first, last = time.time(), None, None
    for step in range(1, steps + 1):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        loss = _lm_loss(kind, model, batch, tok.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 100 == 0 or step == steps:
            log(f"  {kind} LM pretrain step {step}/{steps} loss {last:.3f} ({time.time() - t0:.0f}s)")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(tmp))  # next to the tokenizer files written above
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return {"kind": kind, "steps": steps, "initial_loss": first, "final_loss": last, "vocab": len(tok),
            "params": sum(p.numel() for p in model.parameters()), "dir": str(out_dir),
            "seconds": round(time.time() - t0, 1)}


def build_demo_llms(train_split: str, out_dir: str | Path, kinds: tuple[str, ...] = KINDS, steps: int = 400,
                    seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """`out_dir/{opt,llama,t5}`: each a pretrained tiny LM + tokenizer; existing folders are reused."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts: Optional[DemoTexts] = None
    info = {}
    for kind in kinds:
        folder = out_dir / kind
        if (folder / "config.json").is_file():
            log(f"assets: reusing {folder}")
            continue
        texts = texts or read_demo_texts(train_split, seed)
        log(f"assets: pretraining the tiny {kind} LM on {len(texts.captions)} captions and "
            f"{len(texts.instructions)} instruction/answer pairs (train split only)")
        info[kind] = pretrain_llm(kind, texts, folder, steps=steps, seed=seed, log=log)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blip_train.demo.llms", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="MDS train split (synthetic dataset)")
    p.add_argument("--out", required=True, help="assets folder; writes opt/, llama/, t5/")
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args(argv)
    print(build_demo_llms(args.train, args.out, steps=args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
