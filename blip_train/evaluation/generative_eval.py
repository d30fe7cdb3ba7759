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
                   gen_kwargs: dict) -> dict[int, str]:
    """{sample index: generated text} for all samples, each rank generating whole batches of its own."""
    model.eval()
    rank, world = _rank_world()
    device = next(model.parameters()).device
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    mine: dict[int, str] = {}
    for chunk in batches[rank::world]:
        batch = collate(chunk)
        # InstructBLIP batches carry the instruction for the Q-Former; stage-2 batches do not.
        q_ids, q_mask = (batch[k].to(device) if k in batch else None
                         for k in ("qformer_input_ids", "qformer_attention_mask"))
        ids = model.generate(batch["pixel_values"].to(device), batch["llm_input_ids"].to(device),
                             batch["llm_attention_mask"].to(device), q_ids, q_mask, **gen_kwargs)
        for s, text in zip(chunk, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            mine[s["index"]] = text.strip()
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for p in parts for k, v in p.items()}
    return mine


def evaluate_captions(model, collate, tokenizer, cfg: ExperimentConfig, split: str,
                      gen_kwargs: dict) -> tuple[dict[str, float], list[dict]]:
    samples = load_samples(split, cfg.model.vision.image_size, cfg.eval.max_samples)
    preds = generate_texts(model, collate, tokenizer, samples, cfg.eval.batch_size, gen_kwargs)
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
                 gen_kwargs: dict) -> tuple[dict[str, float], list[dict]]:
    samples = load_samples(split, cfg.model.vision.image_size, cfg.eval.max_samples,
                           keep=lambda row: row["task"] == "vqa" and bool(row["question"]) and len(row["answers"]) > 0)
    if not samples:
        raise ValueError(f"{split}: no VQA samples (task 'vqa' with a question and answers)")
    preds = generate_texts(model, collate, tokenizer, samples, cfg.eval.batch_size, gen_kwargs)
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
