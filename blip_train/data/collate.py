"""Text pre-processing and batch collation: tokenisation, truncation and the -100 masking live here.

Models receive ready tensors and never tokenise (unlike LAVIS, which tokenises inside forward).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from blip_train.data.tokenizers import DEC_TOKEN

IGNORE_INDEX = -100

_PUNCT = re.compile(r"[.!\"()*#:;~]")  # removed by BLIP; , ? ' - / & stay (they carry meaning)
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lowercase, drop decorative punctuation, collapse spaces, cap words."""
    text = _PUNCT.sub(" ", caption.lower())
    text = _SPACES.sub(" ", text).strip()
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def stack_images(samples: Sequence[dict[str, Any]]) -> torch.Tensor:
    """(B, 3, H, W) float from the samples' `pixel_values`."""
    return torch.stack([s["pixel_values"] for s in samples]).float()


class Stage1Collator:
    """Q-Former stage-1 batches (ITC / ITM / ITG) from `ImageTextDataset` samples.

    Output, exactly:
        pixel_values  float (B, 3, H, W)
        text_ids      long  (B, T)  [CLS] caption [SEP], right-padded, T <= max_txt_len
        text_mask     long  (B, T)  1 for real tokens
        itg_input_ids long  (B, T)  text_ids with the first token ([CLS]) replaced by [DEC]
        itg_labels    long  (B, T)  itg_input_ids with padding → -100 (the model shifts them)
        image_ids     long  (B,)    same id = same image (soft ITC positives)
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_txt_len: int = 32, max_words: int = 50) -> None:
        dec_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
        if dec_id is None or dec_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {DEC_TOKEN} token: load it with load_qformer_tokenizer()")
        self.tokenizer = tokenizer
        self.max_txt_len = max_txt_len
        self.max_words = max_words
        self.dec_id = dec_id

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [pre_caption(s["caption"], self.max_words) for s in samples]
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_txt_len,
                             return_tensors="pt")
        text_ids = tok["input_ids"].long()  # (B, T)
        text_mask = tok["attention_mask"].long()  # (B, T)
        itg_input_ids = text_ids.clone()
        itg_input_ids[:, 0] = self.dec_id
        itg_labels = itg_input_ids.masked_fill(text_mask == 0, IGNORE_INDEX)
        return {
            "pixel_values": stack_images(samples),
            "text_ids": text_ids,
            "text_mask": text_mask,
            "itg_input_ids": itg_input_ids,
            "itg_labels": itg_labels,
            "image_ids": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.long),
        }


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Generic collation for evaluation and inspection: images stacked, ints as long tensors,
    everything else (strings, answer lists) as Python lists."""
    out: dict[str, Any] = {"pixel_values": stack_images(samples)}
    for key in samples[0]:
        if key == "pixel_values":
            continue
        values = [s[key] for s in samples]
        out[key] = torch.tensor(values, dtype=torch.long) if isinstance(values[0], int) else values
    return out


def _pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to (B, T) ids and a (B, T) 0/1 mask; `left` for generation prompts."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _qformer_text(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    tok = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {"qformer_input_ids": tok["input_ids"].long(), "qformer_attention_mask": tok["attention_mask"].long()}


class _LLMCollatorBase:
    """Shared set-up: what is the prompt (instruction) and what is the target of a sample.

    mode="caption": prompt is the fixed `prompt` (stage 2, e.g. "a photo of"), target the caption.
    mode="instruct": prompt is the sample's `question` (already templated by the caller, or by
    `format_prompt(sample)`), target its `answer`; the instruction also enters the Q-Former when a
    `qformer_tokenizer` is given (InstructBLIP).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_txt_len: int = 32, max_prompt_len: int = 128,
                 prompt: str = "", mode: str = "caption", qformer_tokenizer: Optional[PreTrainedTokenizerBase] = None,
                 qformer_max_len: int = 128, format_prompt: Optional[Callable[[dict], str]] = None,
                 prompt_only: bool = False) -> None:
        if mode not in ("caption", "instruct"):
            raise ValueError(f"mode must be caption | instruct, got {mode!r}")
        self.tokenizer, self.mode, self.prompt = tokenizer, mode, prompt
        self.max_txt_len, self.max_prompt_len = max_txt_len, max_prompt_len
        self.qformer_tokenizer, self.qformer_max_len = qformer_tokenizer, qformer_max_len
        self.format_prompt = format_prompt
        self.prompt_only = prompt_only
        """Generation batches: prompt ids only (left-padded for decoder-only), no labels."""

    def prompt_and_target(self, sample: dict[str, Any]) -> tuple[str, str]:
        if self.mode == "caption":
            return self.prompt, pre_caption(sample["caption"])
        prompt = self.format_prompt(sample) if self.format_prompt else sample["question"]
        return prompt, sample["answer"]

    def encode(self, text: str, max_len: int) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]

    def finish(self, samples: Sequence[dict[str, Any]], prompts: list[str], out: dict[str, Any]) -> dict[str, Any]:
        out = {"pixel_values": stack_images(samples), **out}
        if self.qformer_tokenizer is not None:
            out.update(_qformer_text(self.qformer_tokenizer, prompts, self.qformer_max_len))
        return out


class DecoderLMCollator(_LLMCollatorBase):
    """Decoder-only LLM batches (OPT, LLaMA/Vicuna), loss on the target text only.

    Sequence per sample: [bos] prompt target end, right-padded. `end_of_text` is the string that ends
    a target ("\\n" for OPT, as BLIP-2 trains it); None appends the eos token instead.
    Output: pixel_values, llm_input_ids, llm_attention_mask, llm_labels (bos/prompt/padding → -100;
    the model prepends the query positions, also -100, and the LM shifts), [+ qformer_input_ids,
    qformer_attention_mask]. With prompt_only: [bos] prompt, left-padded, no labels.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *args: Any, end_of_text: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(tokenizer, *args, **kwargs)
        self.end_of_text = end_of_text

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        seqs, labels, prompts = [], [], []
        for s in samples:
            prompt, target = self.prompt_and_target(s)
            prompts.append(prompt)
            head = bos + (self.encode(prompt, self.max_prompt_len) if prompt else [])
            if self.prompt_only:
                seqs.append(head)
                continue
            if prompt and not prompt[-1].isspace():
                target = " " + target  # BPE: the target's first word keeps its leading-space token
            if self.end_of_text is not None:
                tail = self.encode(target + self.end_of_text, self.max_txt_len)
            else:
                tail = self.encode(target, self.max_txt_len - 1) + [self.tokenizer.eos_token_id]
            seqs.append(head + tail)
            labels.append([IGNORE_INDEX] * len(head) + tail)
        ids, mask = _pad(seqs, pad, left=self.prompt_only)
        out = {"llm_input_ids": ids, "llm_attention_mask": mask}
        if not self.prompt_only:
            lab, _ = _pad(labels, IGNORE_INDEX)
            out["llm_labels"] = lab
        return self.finish(samples, prompts, out)


class T5PrefixCollator(_LLMCollatorBase):
    """Encoder-decoder LLM batches (FlanT5): encoder text → decoder target, loss on the target.

    mode="caption" is BLIP-2's prefix LM: each caption is split at a random word between position 1
    and its middle; the encoder gets `prompt` + prefix (after the queries), the decoder the suffix.
    mode="instruct": encoder gets the instruction, decoder the answer.
    Output: pixel_values, encoder_input_ids, encoder_attention_mask, decoder_labels (padding → -100;
    T5 shifts them right itself), decoder_attention_mask [+ qformer_input_ids, qformer_attention_mask].
    """

    def split_caption(self, caption: str) -> tuple[str, str]:
        words = caption.split(" ")
        if len(words) < 2:
            return "", caption
        # Worker RNG (seeded per DataLoader worker), so splits differ between epochs and workers.
        k = int(torch.randint(1, max(1, len(words) // 2) + 1, (1,)).item())
        return " ".join(words[:k]), " ".join(words[k:])

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        eos = self.tokenizer.eos_token_id
        enc, dec, prompts = [], [], []
        for s in samples:
            prompt, target = self.prompt_and_target(s)
            if self.mode == "caption" and not self.prompt_only:
                prefix, target = self.split_caption(target)
                prompt = " ".join(p for p in (prompt, prefix) if p)
            prompts.append(prompt)
            enc.append(self.encode(prompt, self.max_prompt_len - 1) + [eos])
            dec.append(self.encode(target, self.max_txt_len - 1) + [eos])
        enc_ids, enc_mask = _pad(enc, self.tokenizer.pad_token_id)
        out = {"encoder_input_ids": enc_ids, "encoder_attention_mask": enc_mask}
        if not self.prompt_only:
            dec_ids, dec_mask = _pad(dec, self.tokenizer.pad_token_id)
            out["decoder_labels"] = dec_ids.masked_fill(dec_mask == 0, IGNORE_INDEX)
            out["decoder_attention_mask"] = dec_mask
        return self.finish(samples, prompts, out)
