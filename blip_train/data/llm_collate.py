"""Batches for the frozen-LLM stages (BLIP-2 stage 2, InstructBLIP): tokenisation and -100 masking.

Every collator returns the same keys, which is the whole contract with `models/llm_bridge.py`:

    pixel_values        uint8 (B, 3, H, W) from the training transform (float from the evaluation one);
                        `data.device.finish_batch` normalises it on the device
    llm_input_ids       long  (B, T)   decoder-only: the text after the query positions
                                       encoder-decoder: the encoder text after the query positions
    llm_attention_mask  long  (B, T)   1 = real token
    llm_labels          long  (B, T')  decoder-only: aligned with llm_input_ids (T' = T), -100 except
                                       the target tokens; encoder-decoder: the decoder targets, pad → -100
    qformer_input_ids, qformer_attention_mask   (InstructCollator with a Q-Former tokenizer only) the
                        instruction (InstructBLIP) or question (BLIP-2 VQA fine-tuning) for the Q-Former

The model prepends the query positions (never counted in the loss) and the HF LLM shifts the labels.
Training batches are right-padded; `generation=True` batches carry no labels and left-pad the
decoder-only prompt so that every row's last position is a real token (HF's generate continues
from the last position).

Randomness (T5 split points, instruction templates) is drawn per sample from the reader's `draw_seed`
(a function of the data seed, the epoch and the sample): the same whatever the worker or process, so
a resumed run draws exactly what the uninterrupted one did.
"""
from __future__ import annotations

import os
import random
from typing import Any, Optional, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from blip_train.data.collate import IGNORE_INDEX, collate_samples, pre_caption
from blip_train.data.device import collate_images
from blip_train.data.templates import Templates, choose_instruction, eval_instruction, load_templates


def load_llm_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer from its local HF folder, ready for training batches.

    LLaMA/Vicuna ship without a pad token; padding positions are masked (attention 0, label -100),
    so any existing id serves: unk (else eos). No token is added, so the frozen embedding matrix is
    never resized.
    """
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = "right"
    tok.truncation_side = "right"
    return tok


def _pad(seqs: Sequence[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists → (B, T) ids and (B, T) 0/1 mask, padded on the right (or left)."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def _pad_labels(seqs: Sequence[list[int]]) -> torch.Tensor:
    return _pad(seqs, IGNORE_INDEX)[0]


def sample_random(sample: dict[str, Any], salt: int) -> random.Random:
    """The text randomness of one sample: seeded by the reader's per-(seed, epoch, sample) `draw_seed`.

    Draws then depend on neither the DataLoader worker nor the process, so a resumed run draws what the
    uninterrupted run drew. `salt` (the collator's seed) separates runs that differ only in run.seed.
    """
    if "draw_seed" not in sample:
        raise KeyError("training samples need 'draw_seed' (set by blip_train.data.datasets readers)")
    return random.Random(f"{salt}-{int(sample['draw_seed'])}")


class _LLMText:
    """Tokenisation rules shared by the collators (no special tokens unless added explicitly)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the LLM tokenizer has no pad token: load it with load_llm_tokenizer()")
        self.tok = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def ids(self, text: str, max_len: Optional[int] = None) -> list[int]:
        """Token ids of `text`, at most `max_len` of them (its beginning: captions and answers)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        return ids if max_len is None else ids[:max(0, max_len)]

    def tail_ids(self, text: str, max_len: int) -> list[int]:
        """Token ids of `text`, at most its last `max_len`: an instruction keeps its question and cue."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        return ids[len(ids) - max_len:] if max_len > 0 and len(ids) > max_len else (ids if max_len > 0 else [])

    @staticmethod
    def continuation(context: str, text: str) -> str:
        # Byte-level BPE keeps the leading space in a word's token: " a" after "a photo of" is what the
        # LM saw in pretraining, and what it produces when it continues the prompt at generation.
        return " " + text if context and not context[-1].isspace() else text

    def target(self, context: str, text: str, max_len: int, eos_text: Optional[str]) -> list[int]:
        """Target ids: text then the end marker (`eos_text`, else the eos id), at most max_len in all;
        truncation cuts the text, never the end marker."""
        end = self.ids(eos_text) if eos_text is not None else [self.eos]
        return self.ids(self.continuation(context, text), max_len - len(end)) + end


class DecoderLMCollator:
    """Stage 2 with a decoder-only LLM (OPT, LLaMA/Vicuna): [bos] prompt caption end, loss on caption + end.

    Row i of llm_input_ids: bos, prompt tokens, caption tokens, end marker, padding (right).
    llm_labels: -100 on bos, prompt and padding; the caption and end-marker ids elsewhere.
    `eos_text` ends every caption ("\\n" for OPT, as BLIP-2 trains it); None appends the eos id.
    The caption is `pre_caption`-cleaned; at most max_txt_len target tokens (end marker included).
    `generation=True`: [bos] prompt only, left-padded, no labels, sample metadata passed through.
    """

    def __init__(self, llm_tokenizer: PreTrainedTokenizerBase, prompt: str = "", max_txt_len: int = 32,
                 eos_text: Optional[str] = "\n", max_words: int = 50, generation: bool = False) -> None:
        self.text = _LLMText(llm_tokenizer)
        self.prompt = prompt.rstrip()
        self.max_txt_len, self.eos_text, self.max_words = max_txt_len, eos_text, max_words
        self.generation = generation

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        head = self.text.bos + self.text.ids(self.prompt)
        if self.generation:
            ids, mask = _pad([head] * len(samples), self.text.pad, left=True)
            return {**collate_samples(samples), "llm_input_ids": ids, "llm_attention_mask": mask}
        seqs, labels = [], []
        for s in samples:
            body = self.text.target(self.prompt, pre_caption(s["caption"], self.max_words), self.max_txt_len,
                                    self.eos_text)
            seqs.append(head + body)
            labels.append([IGNORE_INDEX] * len(head) + body)
        ids, mask = _pad(seqs, self.text.pad)
        return {**collate_images(samples), "llm_input_ids": ids, "llm_attention_mask": mask,
                "llm_labels": _pad_labels(labels)}


def t5_split_point(num_tokens: int, rng: random.Random) -> int:
    """Prefix length k for a caption of `num_tokens` tokens: uniform in [1, max(1, num_tokens // 2)].

    The prefix is never empty and never longer than the suffix (for n >= 2 the suffix keeps
    n - k >= ceil(n / 2) >= 1 tokens); a 1-token caption gives k = 1 and an eos-only target; an
    empty caption k = 0.
    """
    if num_tokens <= 0:
        return 0
    return rng.randint(1, max(1, num_tokens // 2))


class T5PrefixCollator:
    """Stage 2 with an encoder-decoder LLM (FlanT5): BLIP-2's prefix language modelling.

    The caption's tokens t_1..t_n (n <= max_txt_len - 1 after truncation) are split at k =
    `t5_split_point(n)`: the encoder text (after the queries) is prompt + t_1..t_k + </s>, the
    decoder target t_{k+1}..t_n + </s>. llm_labels pads with -100 (T5 shifts labels right itself).
    `prefix_lm=False`: k = 0, the whole caption is the target (captioning from the image alone, for
    evaluation). `generation=True`: encoder text = prompt + </s> (no prefix), no labels.
    """

    def __init__(self, llm_tokenizer: PreTrainedTokenizerBase, max_txt_len: int = 32, prompt: str = "",
                 seed: int = 0, max_words: int = 50, generation: bool = False, prefix_lm: bool = True) -> None:
        self.text = _LLMText(llm_tokenizer)
        if self.text.eos is None:
            raise ValueError("the T5 tokenizer has no eos token")
        self.prompt = prompt.rstrip()
        self.max_txt_len, self.max_words, self.generation = max_txt_len, max_words, generation
        self.prefix_lm = prefix_lm
        self.seed = seed

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        prompt_ids, eos = self.text.ids(self.prompt), self.text.eos
        if self.generation:
            ids, mask = _pad([prompt_ids + [eos]] * len(samples), self.text.pad)
            return {**collate_samples(samples), "llm_input_ids": ids, "llm_attention_mask": mask}
        enc, dec = [], []
        for s in samples:
            caption = self.text.continuation(self.prompt, pre_caption(s["caption"], self.max_words))
            toks = self.text.ids(caption, self.max_txt_len - 1)  # room for </s> in the target
            k = t5_split_point(len(toks), sample_random(s, self.seed)) if self.prefix_lm else 0
            enc.append(prompt_ids + toks[:k] + [eos])
            dec.append(toks[k:] + [eos])
        ids, mask = _pad(enc, self.text.pad)
        return {**collate_images(samples), "llm_input_ids": ids, "llm_attention_mask": mask,
                "llm_labels": _pad_labels(dec)}


class InstructCollator:
    """InstructBLIP batches: a templated instruction for the Q-Former and the LLM, loss on the answer.

    Per sample: instruction = `choose_instruction(task, question)` (one random template of the
    sample's task; the fixed `eval` one when generation=True), answer = the sample's `answer`.
    - qformer_input_ids / qformer_attention_mask: [CLS] instruction [SEP] (Q-Former tokenizer),
      right-padded, at most max_qformer_len tokens (the config's model.max_txt_len).
    - An instruction longer than its limit keeps its end (question and answer cue), here and below.
    - decoder_only: llm_input_ids = bos, instruction (<= max_prompt_len tokens), answer, end marker,
      padding; llm_labels -100 everywhere except answer + end marker (<= max_txt_len tokens).
    - encoder-decoder: llm_input_ids = instruction (<= max_prompt_len - 1) + </s> (the encoder text),
      llm_labels = answer (<= max_txt_len - 1) + </s>, pad → -100.
    `eos_text` None ends answers with the eos id; generation=True drops answers (decoder-only prompts
    left-padded) and passes sample metadata (answers, question_id, ...) through.
    The same collator serves BLIP-2's VQA: with `templates=question_templates("Question: {} Answer:")` the
    question template is fixed (fine-tuning with model.qformer_text_input), and with qformer_tokenizer None
    no text goes to the Q-Former (zero-shot VQA of a plain stage-2 model: the LLM alone sees the question).
    """

    def __init__(self, qformer_tokenizer: Optional[PreTrainedTokenizerBase], llm_tokenizer: PreTrainedTokenizerBase,
                 templates: Optional[Templates] = None, max_prompt_len: int = 128, max_txt_len: int = 256,
                 decoder_only: bool = True, max_qformer_len: Optional[int] = None,
                 eos_text: Optional[str] = None, seed: int = 0, generation: bool = False) -> None:
        self.qtok = qformer_tokenizer
        self.text = _LLMText(llm_tokenizer)
        self.templates = templates or load_templates()
        self.max_prompt_len, self.max_txt_len = max_prompt_len, max_txt_len
        self.max_qformer_len = max_qformer_len or max_prompt_len
        self.decoder_only, self.eos_text, self.generation = decoder_only, eos_text, generation
        self.seed = seed

    def instruction(self, sample: dict[str, Any]) -> str:
        task, question = sample.get("task") or "caption", sample.get("question") or ""
        if self.generation:
            return eval_instruction(task, question, self.templates)
        return choose_instruction(task, question, sample_random(sample, self.seed), self.templates)

    def qformer_ids(self, instruction: str) -> list[int]:
        """[CLS] instruction [SEP] for the Q-Former, at most max_qformer_len tokens, keeping the tail."""
        ids = self.qtok(instruction, add_special_tokens=True, truncation=False)["input_ids"]
        if len(ids) <= self.max_qformer_len:
            return ids
        return ids[:1] + ids[len(ids) - (self.max_qformer_len - 1):]  # (max,) [CLS] + tail, ending in [SEP]

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        # Too-long instructions lose their beginning, never their end: templates end with the question
        # and the answer cue ("... Short answer:"), as LAVIS keeps the tail for decoder-only LLMs.
        instructions = [self.instruction(s) for s in samples]
        out: dict[str, Any] = collate_samples(samples) if self.generation else collate_images(samples)
        if self.qtok is not None:
            out["qformer_input_ids"], out["qformer_attention_mask"] = _pad(
                [self.qformer_ids(inst) for inst in instructions], self.qtok.pad_token_id)
        t = self.text
        if self.decoder_only:
            heads = [t.bos + t.tail_ids(inst, self.max_prompt_len) for inst in instructions]
            if self.generation:
                out["llm_input_ids"], out["llm_attention_mask"] = _pad(heads, t.pad, left=True)
                return out
            bodies = [t.target(inst, s["answer"].strip(), self.max_txt_len, self.eos_text)
                      for inst, s in zip(instructions, samples)]
            out["llm_input_ids"], out["llm_attention_mask"] = _pad([h + b for h, b in zip(heads, bodies)], t.pad)
            out["llm_labels"] = _pad_labels([[IGNORE_INDEX] * len(h) + b for h, b in zip(heads, bodies)])
            return out
        enc = [t.tail_ids(inst, self.max_prompt_len - 1) + [t.eos] for inst in instructions]
        out["llm_input_ids"], out["llm_attention_mask"] = _pad(enc, t.pad)
        if not self.generation:
            out["llm_labels"] = _pad_labels([t.target("", s["answer"].strip(), self.max_txt_len, None)
                                             for s in samples])
        return out


class QuestionCollator:
    """BLIP-2 VQA batches (question-aware stage 2): InstructCollator's, with one fixed question template.

    Every row must be a question with an answer (VQA splits); its `task` is read as "vqa", so OK-VQA, GQA
    or short-answer rows all take the template. A row without a question (a caption row) is refused,
    naming its dataset: it would train the model to answer a question it was never asked.
    """

    def __init__(self, inner: InstructCollator) -> None:
        self.inner = inner
        self.qtok = inner.qtok

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        for s in samples:
            if not (s.get("question") or "").strip():
                raise ValueError(f"model.qformer_text_input trains on questions: a {s.get('task') or 'caption'!r} "
                                 f"row of dataset {s.get('dataset') or '?'!r} has none (train on VQA splits from "
                                 "tools/convert_vqa.py)")
        return self.inner([dict(s, task="vqa") for s in samples])
