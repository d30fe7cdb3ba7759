"""Text pre-processing and batch collation: tokenisation, truncation and the -100 masking live here.

Models receive ready tensors and never tokenise (unlike LAVIS, which tokenises inside forward).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from blip_train.data.device import collate_images
from blip_train.data.tokenizers import DEC_TOKEN, ENC_TOKEN

IGNORE_INDEX = -100

_PUNCT = re.compile(r"[.!\"()*#:;~]")  # removed by BLIP; , ? ' - / & stay (they carry meaning)
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lowercase, drop decorative punctuation, collapse spaces, cap words."""
    text = _PUNCT.sub(" ", caption.lower())
    text = _SPACES.sub(" ", text).strip()
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


class Stage1Collator:
    """Q-Former stage-1 batches (ITC / ITM / ITG) from `ImageTextDataset` samples.

    Output, exactly:
        pixel_values  uint8 (B, 3, H, W)  from the training transform; `data.device.finish_batch` normalises
                      it on the device (and decodes the `jpeg_crops` that data.decode=gpu adds)
        text_ids      long  (B, T)  [CLS] caption [SEP], right-padded, T <= max_txt_len
        text_mask     long  (B, T)  1 for real tokens
        itg_input_ids long  (B, T)  text_ids with the first token ([CLS]) replaced by [DEC]
        itg_labels    long  (B, T)  itg_input_ids with padding → -100 (the model shifts them)
        image_ids     long  (B,)    same id = same image (soft ITC positives, ITM positive masks)

    `image_ids` combine a sample's stream (set by the readers) with its `image_id`: every converter
    numbers images from 0, so in a mixture the raw ids of two streams name different images.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_txt_len: int = 32, max_words: int = 50) -> None:
        dec_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
        if dec_id is None or dec_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {DEC_TOKEN} token: load it with load_qformer_tokenizer()")
        self.tokenizer = tokenizer
        self.max_txt_len = max_txt_len
        self.max_words = max_words
        self.dec_id = dec_id

    def texts(self, samples: Sequence[dict[str, Any]]) -> list[str]:
        return [pre_caption(s["caption"], self.max_words) for s in samples]

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = self.texts(samples)
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_txt_len,
                             return_tensors="pt")
        text_ids = tok["input_ids"].long()  # (B, T)
        text_mask = tok["attention_mask"].long()  # (B, T)
        itg_input_ids = text_ids.clone()
        itg_input_ids[:, 0] = self.dec_id
        itg_labels = itg_input_ids.masked_fill(text_mask == 0, IGNORE_INDEX)
        return {
            **collate_images(samples),
            "text_ids": text_ids,
            "text_mask": text_mask,
            "itg_input_ids": itg_input_ids,
            "itg_labels": itg_labels,
            "image_ids": torch.tensor([unique_image_id(s) for s in samples], dtype=torch.long),
        }


class BlipCollator(Stage1Collator):
    """BLIP batches: `Stage1Collator`'s keys plus
        itm_input_ids long (B, T)  text_ids with the first token ([CLS]) replaced by [ENC] (the MED's
                                   image-grounded encoder; the unimodal one reads [CLS], the decoder [DEC])
    With a `prompt` (captioning fine-tuning, model.text.prompt) every text is the prompt then the caption, and
    the prompt's positions are -100 in itg_labels: the decoder reads the prompt but is not trained to write it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_txt_len: int = 32, max_words: int = 50,
                 prompt: str = "") -> None:
        super().__init__(tokenizer, max_txt_len, max_words)
        enc_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
        if enc_id is None or enc_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {ENC_TOKEN} token: load it with load_blip_tokenizer()")
        self.enc_id = enc_id
        self.prompt = prompt
        self.prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def texts(self, samples: Sequence[dict[str, Any]]) -> list[str]:
        return [self.prompt + t for t in super().texts(samples)]

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(samples)
        batch["itm_input_ids"] = batch["text_ids"].clone()
        batch["itm_input_ids"][:, 0] = self.enc_id
        batch["itg_labels"][:, :1 + self.prompt_len] = IGNORE_INDEX  # [DEC] and the prompt
        return batch


class BlipCaptionCollator:
    """Caption generation batches for BLIP's decoder: pixel_values and
        prompt_ids long (B, P)  [DEC] then the prompt's tokens (no [SEP]), the same in every row
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt: str = "") -> None:
        dec_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
        if dec_id is None or dec_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {DEC_TOKEN} token: load it with load_blip_tokenizer()")
        self.prompt_ids = [dec_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {**collate_images(samples),
                "prompt_ids": torch.tensor([self.prompt_ids] * len(samples), dtype=torch.long)}


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's question cleaning: lowercase, decorative punctuation removed (the question mark stays), words capped."""
    words = _PUNCT.sub("", question.lower()).rstrip(" ").split(" ")
    return " ".join(words[:max_words])


SINGLE_ANSWER_WEIGHT = 0.2
"""BLIP's loss weight for a question with one human answer (Visual Genome QA); VQAv2's ten annotators' answers
weigh their share instead (a question's weights then sum to 1)."""


def weighted_answers(sample: dict[str, Any]) -> list[tuple[str, float]]:
    """(distinct answer, weight) of a VQA sample, BLIP's way: each distinct human answer weighs the share of the
    answers that gave it; a sample with one answer weighs SINGLE_ANSWER_WEIGHT."""
    answers = [a.strip() for a in sample.get("answers") or [] if a.strip()]
    if len(answers) > 1:
        return [(a, n / len(answers)) for a, n in Counter(answers).items()]
    answer = (sample.get("answer") or "").strip() or (answers[0] if answers else "")
    if not answer:
        raise ValueError(f"VQA fine-tuning trains on answers: a question of dataset {sample.get('dataset') or '?'!r} "
                         "has none (train on VQA splits with answers from tools/convert_vqa.py)")
    return [(answer, SINGLE_ANSWER_WEIGHT)]


class BlipVQACollator:
    """BLIP VQA batches (model.objective=vqa) from `VQADataset` samples:
        pixel_values   uint8 (B, 3, H, W)
        question_ids   long  (B, Tq)  [ENC] question [SEP] (BLIP's `pre_question`), right-padded
        question_mask  long  (B, Tq)
    and unless generation=True, one row per (question, distinct answer), N rows in all:
        answer_ids     long  (N, Ta)  [DEC] answer [SEP], right-padded
        answer_mask    long  (N, Ta)
        answer_labels  long  (N, Ta)  answer_ids with padding -100 ([DEC] is never a target after the shift)
        answer_owner   long  (N,)     the question's row
        answer_weight  float (N,)     `weighted_answers`
    A row without a question (a caption row) is refused, naming its dataset.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_question_len: int = 35, max_answer_len: int = 10,
                 generation: bool = False) -> None:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ENC_TOKEN, DEC_TOKEN)}
        for token, i in ids.items():
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {token} token: load it with load_blip_tokenizer()")
        self.tokenizer, self.enc_id, self.dec_id = tokenizer, ids[ENC_TOKEN], ids[DEC_TOKEN]
        self.max_question_len, self.max_answer_len, self.generation = max_question_len, max_answer_len, generation

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for s in samples:
            if not (s.get("question") or "").strip():
                raise ValueError(f"model.objective=vqa trains on questions: a {s.get('task') or 'caption'!r} row of "
                                 f"dataset {s.get('dataset') or '?'!r} has none (use VQA splits from "
                                 "tools/convert_vqa.py)")
        q = self.tokenizer([pre_question(s["question"]) for s in samples], padding="longest", truncation=True,
                           max_length=self.max_question_len, return_tensors="pt")
        question_ids = q["input_ids"].long()  # (B, Tq)
        question_ids[:, 0] = self.enc_id
        out = {**collate_images(samples), "question_ids": question_ids, "question_mask": q["attention_mask"].long()}
        if self.generation:
            return out
        owned = [(row, a, w) for row, s in enumerate(samples) for a, w in weighted_answers(s)]
        a = self.tokenizer([a for _, a, _ in owned], padding="longest", truncation=True,
                           max_length=self.max_answer_len, return_tensors="pt")
        answer_ids, answer_mask = a["input_ids"].long(), a["attention_mask"].long()  # (N, Ta)
        answer_ids[:, 0] = self.dec_id
        return {**out, "answer_ids": answer_ids, "answer_mask": answer_mask,
                "answer_labels": answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX),
                "answer_owner": torch.tensor([row for row, _, _ in owned], dtype=torch.long),
                "answer_weight": torch.tensor([w for _, _, w in owned], dtype=torch.float32)}


def tokenize_answer_candidates(tokenizer: PreTrainedTokenizerBase, answers: Sequence[str],
                               max_answer_len: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer_ids, answer_mask) (C, Ta) of candidate answers as the VQA decoder reads them: [DEC] answer [SEP]."""
    a = tokenizer(list(answers), padding="longest", truncation=True, max_length=max_answer_len, return_tensors="pt")
    ids = a["input_ids"].long()
    ids[:, 0] = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
    return ids, a["attention_mask"].long()


IMAGE_ID_BITS = 40
"""Bits of a stream's image ids inside a batch's `image_ids` (the stream index sits above them)."""


def unique_image_id(sample: dict[str, Any]) -> int:
    """The sample's image id made unique across the streams of a mixture: stream << 40 | image_id."""
    image_id, stream = int(sample["image_id"]), int(sample.get("stream", 0))
    if not 0 <= image_id < 2 ** IMAGE_ID_BITS:
        raise ValueError(f"image_id {image_id} (dataset {sample.get('dataset', '?')!r}) is outside "
                         f"[0, 2**{IMAGE_ID_BITS}): converters write non-negative ids")
    return (stream << IMAGE_ID_BITS) | image_id


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Generic collation for evaluation and inspection: images stacked (`collate_images`), ints as long
    tensors, everything else (strings, answer lists) as Python lists."""
    out: dict[str, Any] = collate_images(samples)
    for key in samples[0]:
        if key == "pixel_values":
            continue
        values = [s[key] for s in samples]
        out[key] = torch.tensor(values, dtype=torch.long) if isinstance(values[0], int) else values
    return out
