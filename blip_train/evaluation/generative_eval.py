"""Captioning (CIDEr-D, BLEU-4) and VQA accuracy of stage-2 / InstructBLIP models on an MDS split.

Generation runs on every rank over whole batches dealt round-robin (so a sample's batch does not
depend on the world size); predictions are gathered and scored once. Each task also reports a
`chance` score of a model that ignores the image: for captions, the references of another image; for
VQA, the most frequent answer of the split.
"""
from __future__ import annotations

import io
from collections import Counter
from typing import Any, Callable

import torch
import torch.distributed as dist
from PIL import Image
from streaming import StreamingDataset

from blip_train.config import ExperimentConfig
from blip_train.data.collate import pre_caption
from blip_train.data.schema import verify_split
from blip_train.data.transforms import build_transform
from blip_train.evaluation.caption_metrics import caption_metrics
from blip_train.evaluation.vqa_metrics import exact_match, vqa_accuracy


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_vqa_row(row: dict) -> bool:
    """A row VQA evaluation can score: a question with human answers."""
    return row["task"] == "vqa" and bool(row["question"]) and len(row["answers"]) > 0


def load_samples(split: str, image_size: int, max_samples: int = 0,
                 keep: Callable[[dict], bool] = lambda row: True) -> list[dict[str, Any]]:
    """Schema rows of `split` (all of them on every rank) as reader-style samples with eval transform."""
    verify_split(split)
    ds = StreamingDataset(local=split, shuffle=False, batch_size=1)
    tf = build_transform(image_size, False)
    out = []
    for i in range(ds.num_samples):  # len(ds) would be this rank's share only
        row = ds[i]
        if not keep(row):
            continue
        out.append({"pixel_values": tf(Image.open(io.BytesIO(row["image"])).convert("RGB")),
                    "caption": row["caption"], "captions": list(row["captions"]) or [row["caption"]],
                    "question": row["question"], "answer": row["answer"], "answers": list(row["answers"]),
                    "question_id": int(row["question_id"]) if int(row["question_id"]) >= 0 else i,
                    "image_id": int(row["image_id"]), "task": row["task"], "dataset": row["dataset"],
                    "index": i})
        if max_samples and len(out) >= max_samples:
            break
    return out


@torch.no_grad()
def generate_texts(model, collate, tokenizer, samples: list[dict], batch_size: int,
                   gen_kwargs: dict, shard: bool = True) -> dict[int, str]:
    """{sample index: generated text} for all samples.

    shard=True: each rank generates whole batches of its own (an un-partitioned model per rank).
    shard=False: every rank generates every batch — the ZeRO-3 case inside training, where all ranks
    must make the same module calls (query tokens gathered, synced decoding, see generate.py).
    """
    from blip_train.evaluation.generate import generate_text

    model.eval()
    rank, world = _rank_world() if shard else (0, 1)
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    mine: dict[int, str] = {}
    for chunk in batches[rank::world]:
        for s, text in zip(chunk, generate_text(model, tokenizer, collate(chunk), **gen_kwargs)):
            mine[s["index"]] = text
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for p in parts for k, v in p.items()}
    return mine


def evaluate_captions(model, collate, tokenizer, cfg: ExperimentConfig, split: str,
                      gen_kwargs: dict, shard: bool = True) -> tuple[dict[str, float], list[dict]]:
    samples = load_samples(split, cfg.model.vision.image_size, cfg.eval.max_samples)
    preds = generate_texts(model, collate, tokenizer, samples, cfg.eval.batch_size, gen_kwargs, shard)
    refs = {s["index"]: [pre_caption(c) for c in s["captions"]] for s in samples}
    hyps = {k: pre_caption(v) for k, v in preds.items()}
    scores = caption_metrics(hyps, refs)
    # Chance: each image "captioned" with the first reference of the next image (a mismatched caption).
    order = [s["index"] for s in samples]
    shifted = {k: refs[order[(j + 1) % len(order)]][0] for j, k in enumerate(order)}
    chance = caption_metrics(shifted, refs)
    metrics = {"cider": 100.0 * scores["cider"], "bleu_4": 100.0 * scores["bleu_4"],
               "chance_cider": 100.0 * chance["cider"], "num_images": len(samples)}
    predictions = [{"index": s["index"], "image_id": s["image_id"], "prediction": preds[s["index"]],
                    "references": s["captions"]} for s in samples]
    return metrics, predictions


def evaluate_vqa(model, collate, tokenizer, cfg: ExperimentConfig, split: str,
                 gen_kwargs: dict, shard: bool = True) -> tuple[dict[str, float], list[dict]]:
    samples = load_samples(split, cfg.model.vision.image_size, cfg.eval.max_samples,
                           keep=is_vqa_row)
    if not samples:
        raise ValueError(f"{split}: no VQA samples (task 'vqa' with a question and answers)")
    preds = generate_texts(model, collate, tokenizer, samples, cfg.eval.batch_size, gen_kwargs, shard)
    qid = {s["index"]: s["question_id"] for s in samples}
    answers = {qid[s["index"]]: s["answers"] if len(s["answers"]) >= 2 else s["answers"] * 2 for s in samples}
    predictions = {qid[k]: v for k, v in preds.items()}
    acc = vqa_accuracy(predictions, answers)
    em = exact_match(predictions, {q: [a[0]] for q, a in answers.items()})
    majority = Counter(a for s in samples for a in s["answers"]).most_common(1)[0][0]
    chance = vqa_accuracy({q: majority for q in answers}, answers)
    metrics = {"vqa_accuracy": acc["overall"], "exact_match": em["overall"],
               "chance_vqa_accuracy": chance["overall"], "majority_answer": majority, "num_questions": len(samples)}
    out = [{"question_id": qid[s["index"]], "question": s["question"], "prediction": preds[s["index"]],
            "answers": s["answers"]} for s in samples]
    return metrics, out


def generation_setup(cfg: ExperimentConfig, model, tok, task: str) -> tuple[Callable[[list[dict]], dict], dict]:
    """(collate, generate kwargs) for --task caption|vqa with a stage-2 / InstructBLIP model."""
    from blip_train.data.llm_collate import DecoderLMCollator, InstructCollator, T5PrefixCollator
    from blip_train.data.tokenizers import load_qformer_tokenizer
    from blip_train.training.stages import END_OF_TEXT

    m, e = cfg.model, cfg.eval
    gen: dict[str, Any] = {"num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens}
    if m.arch == "instruct":
        qtok = load_qformer_tokenizer(m.qformer.tokenizer)
        inner = InstructCollator(qtok, tok, max_prompt_len=m.llm.max_prompt_len, max_txt_len=m.llm.max_txt_len,
                                 decoder_only=model.decoder_only, max_qformer_len=m.max_txt_len, generation=True)
        if task == "caption":  # the caption instruction, whatever task the sample was written for
            return (lambda samples: inner([dict(s, task="caption", question="") for s in samples])), gen
        gen["max_new_tokens"] = min(e.max_new_tokens, 10)  # short answers (InstructBLIP's VQA setting)
        return inner, gen
    if model.decoder_only:
        end = END_OF_TEXT.get(model.llm.config.model_type)
        if end is not None:  # OPT stage 2 ends captions with "\n"
            gen["eos_token_id"] = [tok.eos_token_id, tok(end, add_special_tokens=False)["input_ids"][-1]]
        return DecoderLMCollator(tok, prompt=m.llm.prompt, max_txt_len=m.llm.max_txt_len, generation=True), gen
    return T5PrefixCollator(tok, max_txt_len=m.llm.max_txt_len, prompt=m.llm.prompt, generation=True), gen
