"""Captioning (CIDEr-D, BLEU-4) and VQA accuracy of stage-2 / InstructBLIP models on an MDS split.

The split is read twice, never held: a first pass keeps the text that scoring needs (references, answers)
and which rows are evaluated; then each rank reads, decodes and generates its own whole batches, one
batch at a time (dealt round-robin, so a sample's batch does not depend on the world size, see
distributed.py), and the predictions are gathered and scored on every rank. Memory does not grow
with the split beyond that text. Each task also reports a `chance` score of a model that ignores the
image: for captions, the references of another image; for VQA, the most frequent answer of the split.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from streaming import StreamingDataset

from blip_train.config import ExperimentConfig
from blip_train.data.datasets import InputReader, model_input_reader
from blip_train.data.collate import pre_caption
from blip_train.data.schema import verify_split
from blip_train.data.shared_memory import build_streaming_dataset
from blip_train.data.transforms import build_transform
from blip_train.data.video import clip_frames
from blip_train.evaluation.caption_metrics import caption_metrics
from blip_train.evaluation.distributed import all_gather_objects, plan_batches, progress_bar, rank_world
from blip_train.evaluation.vqa_metrics import exact_match, vqa_score


def is_vqa_row(row: dict) -> bool:
    """A row VQA evaluation can score: a question with human answers."""
    return row["task"] == "vqa" and bool(row["question"]) and len(row["answers"]) > 0


@dataclass
class EvalSplit:
    """The rows of a split that an evaluation covers, and how to read one as a model input."""
    ds: StreamingDataset
    indices: list[int]
    """Rows evaluated, in split order."""
    transform: Callable[[bytes], torch.Tensor]
    frames: int = 0
    """Video: frames per sample (model.video_frames); pixel_values is then (frames, 3, S, S)."""
    reader: Optional[InputReader] = None
    """Another modality (model.modality audio | 3d, see datasets.model_input_reader): pixel_values is then what it
    makes of the row, the encoder's input."""

    def read_sample(self, i: int) -> dict[str, Any]:
        """Row `i` as a reader-style sample (decoded image, or video frames, with the eval transform)."""
        row = self.ds[i]
        if self.reader is not None:
            pixels = self.reader(row)
        elif self.frames:
            frames = clip_frames(row)
            if len(frames) != self.frames:
                raise ValueError(f"model.video_frames={self.frames}, but row {i} holds {len(frames)} frame(s)")
            pixels = torch.stack([self.transform(f) for f in frames])
        else:
            pixels = self.transform(row["image"])
        return {"pixel_values": pixels,
                "caption": row["caption"], "captions": list(row["captions"]) or [row["caption"]],
                "question": row["question"], "answer": row["answer"], "answers": list(row["answers"]),
                "task": row["task"], "dataset": row["dataset"], "image_id": int(row["image_id"]), "index": i}


def open_split(split: str, image_size: int, max_samples: int = 0, keep: Callable[[dict], bool] = lambda row: True,
               note: Callable[[int, dict], None] = lambda i, row: None, frames: int = 0,
               reader: Optional[InputReader] = None) -> EvalSplit:
    """The first `max_samples` rows of `split` that `keep` accepts (0: all), every rank the same.

    `note(i, row)` is called on each of them, for the caller to keep what scoring needs (text only:
    images are read again, per batch, by the rank that evaluates them).
    """
    verify_split(split)
    ds = build_streaming_dataset(lambda: StreamingDataset(local=split, shuffle=False, batch_size=1))
    indices = []
    for i in range(ds.num_samples):  # len(ds) would be this rank's share only
        row = ds[i]
        if not keep(row):
            continue
        indices.append(i)
        note(i, row)
        if max_samples and len(indices) >= max_samples:
            break
    return EvalSplit(ds, indices, build_transform(image_size, False), frames, reader)


def open_model_split(split: str, cfg: ExperimentConfig, max_samples: int = 0, **kwargs: Any) -> EvalSplit:
    """`open_split` reading rows as the run's model takes them: images at its size, video frames, audio or 3d."""
    return open_split(split, cfg.model.vision.image_size, max_samples, frames=cfg.model.video_frames,
                      reader=model_input_reader(cfg.model), **kwargs)


@torch.no_grad()
def generate_texts(model, collate, tokenizer, split: EvalSplit, batch_size: int, gen_kwargs: dict,
                   progress: str = "") -> dict[int, str]:
    """{row index: generated text} for every row of `split`, on every rank; all ranks call it together.
    `progress`: the name of rank 0's progress bar over its batches ("": none).

    Each rank generates its own whole batches. With ZeRO-3 weights partitioned over the ranks
    (in-training evaluation) every rank runs the same number of `generate` calls (a rank with fewer
    batches repeats one and discards it) and decodes in lockstep (synced_gpus, see generate.py).
    """
    from blip_train.evaluation.generate import generate_text, needs_synced_gpus

    model.eval()
    rank, world = rank_world()
    mine: dict[int, str] = {}
    plan = plan_batches(len(split.indices), batch_size, rank, world, needs_synced_gpus(model))
    for batch, keep in progress_bar(plan, progress, bool(progress)):
        rows = [split.indices[p] for p in batch]
        texts = generate_text(model, tokenizer, collate([split.read_sample(i) for i in rows]), **gen_kwargs)
        if keep:
            mine.update(zip(rows, texts))
    return {k: v for part in all_gather_objects(mine, world) for k, v in part.items()}


def evaluate_captions(model, collate, tokenizer, cfg: ExperimentConfig, split: str, gen_kwargs: dict, *,
                      max_samples: int, progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-image predictions) of captioning the first `max_samples` rows (0: the whole split).
    progress=True shows rank 0's progress bar (standalone evaluation). Rows whose `source` names a domain
    (NoCaps: nocaps/in-domain, near-domain, out-domain) are also scored per domain (`cider_in_domain`, ...),
    each domain's CIDEr-D on its own images, as NoCaps reports them."""
    refs: dict[int, list[str]] = {}
    image_ids: dict[int, int] = {}
    domains: dict[int, str] = {}

    def note(i: int, row: dict) -> None:
        refs[i] = list(row["captions"]) or [row["caption"]]
        image_ids[i] = int(row["image_id"])
        if "/" in row["source"]:
            domains[i] = row["source"].split("/", 1)[1]

    rows = open_model_split(split, cfg, max_samples, note=note)
    preds = generate_texts(model, collate, tokenizer, rows, cfg.eval.batch_size, gen_kwargs,
                           "caption" if progress else "")
    predictions = [{"index": i, "image_id": image_ids[i], "prediction": preds[i], "references": refs[i],
                    **({"domain": domains[i]} if i in domains else {})} for i in rows.indices]
    if not any(r.strip() for i in rows.indices for r in refs[i]):
        # A split without captions (NoCaps test): the predictions are the result, to submit for scoring.
        return {"num_images": len(rows.indices), "num_references": 0}, predictions
    clean_refs = {i: [pre_caption(c) for c in refs[i]] for i in rows.indices}
    scores = caption_metrics({k: pre_caption(v) for k, v in preds.items()}, clean_refs)
    # Chance: each image "captioned" with the first reference of the next image (a mismatched caption).
    order = rows.indices
    shifted = {k: clean_refs[order[(j + 1) % len(order)]][0] for j, k in enumerate(order)}
    chance = caption_metrics(shifted, clean_refs)
    metrics = {"cider": 100.0 * scores["cider"], "bleu_4": 100.0 * scores["bleu_4"],
               "chance_cider": 100.0 * chance["cider"], "num_images": len(order),
               "num_references": sum(len(refs[i]) for i in order)}
    for domain in sorted(set(domains.values())):
        subset = [i for i in order if domains.get(i) == domain]
        part = caption_metrics({i: pre_caption(preds[i]) for i in subset}, {i: clean_refs[i] for i in subset})
        metrics[f"cider_{domain.replace('-', '_')}"] = 100.0 * part["cider"]
    return metrics, predictions


def evaluate_vqa(model, collate, tokenizer, cfg: ExperimentConfig, split: str, gen_kwargs: dict, *,
                 max_samples: int, progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-question predictions) of the first `max_samples` VQA rows (0: all of the split's).
    progress=True shows rank 0's progress bar (standalone evaluation)."""
    questions: dict[int, tuple[int, int, str, list[str]]] = {}  # row → (question id, image id, question, answers)

    def note(i: int, row: dict) -> None:
        qid = int(row["question_id"])
        questions[i] = (qid if qid >= 0 else i, int(row["image_id"]), row["question"], list(row["answers"]))

    def answer(rows: EvalSplit) -> dict[int, str]:
        preds = generate_texts(model, collate, tokenizer, rows, cfg.eval.batch_size, gen_kwargs,
                               "vqa" if progress else "")
        if "answer_ids" in gen_kwargs:  # ranked over eval.answer_list: report the listed texts
            listed = ranked_answer_texts(tokenizer, cfg.eval.answer_list, cfg.model.max_txt_len)
            preds = {i: listed.get(p, p) for i, p in preds.items()}
        return preds

    rows = open_model_split(split, cfg, max_samples, keep=is_vqa_row, note=note)
    if not rows.indices:
        # A split without human answers (VQAv2 test-dev): answer its questions, to submit for scoring.
        rows = open_model_split(split, cfg, max_samples, note=note,
                                keep=lambda row: row["task"] == "vqa" and bool(row["question"]))
        if not rows.indices:
            raise ValueError(f"{split}: no VQA samples (task 'vqa' with a question)")
        preds = answer(rows)
        out = [{"question_id": questions[i][0], "image_id": questions[i][1], "question": questions[i][2],
                "prediction": preds[i], "answers": []} for i in rows.indices]
        return {"num_questions": len(rows.indices), "num_images": len({q[1] for q in questions.values()})}, out
    preds = answer(rows)
    answers = {q[0]: q[3] for q in questions.values()}
    predictions = {questions[i][0]: preds[i] for i in rows.indices}
    acc = vqa_score(predictions, answers)  # a question with one human answer: exact match
    em = exact_match(predictions, {q: [a[0]] for q, a in answers.items()})
    majority = Counter(a for q in questions.values() for a in q[3]).most_common(1)[0][0]
    chance = vqa_score({q: majority for q in answers}, answers)
    chance_em = exact_match({q: majority for q in answers}, {q: [a[0]] for q, a in answers.items()})
    metrics = {"vqa_accuracy": acc["overall"], "exact_match": em["overall"],
               "chance_vqa_accuracy": chance["overall"], "chance_exact_match": chance_em["overall"],
               "majority_answer": majority,
               "num_questions": len(rows.indices), "num_images": len({q[1] for q in questions.values()})}
    out = [{"question_id": questions[i][0], "image_id": questions[i][1], "question": questions[i][2],
            "prediction": preds[i],
            "answers": questions[i][3]} for i in rows.indices]
    return metrics, out


def read_answer_list(path: str) -> list[str]:
    """eval.answer_list: a JSON list of distinct, non-empty answer strings (ConfigError naming the file otherwise)."""
    import json

    from blip_train.config import ConfigError
    try:
        answers = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"eval.answer_list: {path}: not a readable JSON file ({e.__class__.__name__})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ConfigError(f"eval.answer_list: {path}: expected a JSON list of non-empty answer strings")
    if len(set(answers)) != len(answers):
        raise ConfigError(f"eval.answer_list: {path}: {len(answers) - len(set(answers))} answers are listed twice")
    return answers


def ranked_answer_texts(tokenizer, path: str, max_len: int) -> dict[str, str]:
    """{decoded candidate: its text in eval.answer_list}: a ranked prediction is decoded from the candidate's
    token ids, which BERT's tokenizer does not always turn back into the listed text ("t-shirt" decodes as
    "t - shirt"); predictions then report the listed answer."""
    from blip_train.data.collate import tokenize_answer_candidates

    answers = read_answer_list(path)
    ids, _ = tokenize_answer_candidates(tokenizer, answers, max_len)
    decoded = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return {d: a for d, a in reversed(list(zip(decoded, answers)))}  # the first listed wins a collision


VQA_PROMPTS = {"decoder_only": "Question: {} Answer:", "encoder_decoder": "Question: {} Short answer:"}
"""BLIP-2's VQA prompts (zero-shot and fine-tuned): OPT's, and FlanT5's."""


def vqa_template(cfg: ExperimentConfig, decoder_only: bool) -> str:
    """The VQA question template: eval.vqa_prompt, else the run's own (model.llm.prompt of a question-aware
    stage 2), else BLIP-2's for the LLM kind. InstructBLIP's own is its templates' eval instruction (not here)."""
    if cfg.eval.vqa_prompt:
        return cfg.eval.vqa_prompt
    if cfg.model.qformer_text_input and cfg.model.arch == "stage2":
        return cfg.model.llm.prompt
    return VQA_PROMPTS["decoder_only" if decoder_only else "encoder_decoder"]


def generation_setup(cfg: ExperimentConfig, model, tok, task: str) -> tuple[Callable[[list[dict]], dict], dict]:
    """(collate, generate kwargs) for --task caption|vqa with a stage-2 / InstructBLIP model.

    Captions: eval.num_beams, eval.min/max_new_tokens, eval.length_penalty, the run's prompt (stage 2) or the
    caption instruction (InstructBLIP). VQA (the BLIP-2 / InstructBLIP protocol): eval.num_beams,
    eval.vqa_max_new_tokens, eval.vqa_length_penalty, the question in `vqa_template` (InstructBLIP: its eval
    instruction unless eval.vqa_prompt is set); the question also enters the Q-Former when the model was
    trained that way (InstructBLIP, model.qformer_text_input), else only the LLM sees it (zero-shot stage 2).
    OPT stage 2 stops at "\n" as it was trained to end its text.
    """
    from blip_train.data.llm_collate import DecoderLMCollator, InstructCollator, T5PrefixCollator
    from blip_train.data.templates import question_templates
    from blip_train.data.tokenizers import load_qformer_tokenizer
    from blip_train.training.stages import END_OF_TEXT, build_question_collator

    m, e = cfg.model, cfg.eval
    if m.arch == "blip":  # BLIP's own decoders: captions, or a VQA model's answers (generated or ranked)
        from blip_train.config import blip_task_refusal
        from blip_train.data.collate import BlipCaptionCollator, BlipVQACollator, tokenize_answer_candidates
        if blip_task_refusal(m.objective, task):
            raise ValueError(f"--task {task}: {blip_task_refusal(m.objective, task)}")
        if task == "vqa":
            gen = {"num_beams": e.num_beams, "max_new_tokens": e.vqa_max_new_tokens, "min_new_tokens": 1,
                   "length_penalty": e.vqa_length_penalty}
            if e.answer_list:
                ids, mask = tokenize_answer_candidates(tok, read_answer_list(e.answer_list), m.max_txt_len)
                gen = {"answer_ids": ids, "answer_mask": mask, "k_test": e.k_test}
            return BlipVQACollator(tok, m.max_txt_len, m.max_txt_len, generation=True), gen
        return BlipCaptionCollator(tok, m.text.prompt), {
            "max_new_tokens": e.max_new_tokens, "min_new_tokens": e.min_new_tokens, "num_beams": e.num_beams,
            "length_penalty": e.length_penalty}
    if task == "vqa":
        gen: dict[str, Any] = {"num_beams": e.num_beams, "max_new_tokens": e.vqa_max_new_tokens,
                               "min_new_tokens": 1, "length_penalty": e.vqa_length_penalty}
    else:
        gen = {"num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens, "min_new_tokens": e.min_new_tokens,
               "length_penalty": e.length_penalty}
    if model.decoder_only and m.arch == "stage2":
        end = END_OF_TEXT.get(model.llm.config.model_type)
        if end is not None:  # OPT stage 2 ends its text with "\n"
            gen["eos_token_id"] = [tok.eos_token_id, tok(end, add_special_tokens=False)["input_ids"][-1]]
    qtok = load_qformer_tokenizer(m.qformer.tokenizer) if model.text_to_qformer else None
    if m.arch == "instruct":
        templates = question_templates(e.vqa_prompt) if task == "vqa" and e.vqa_prompt else None
        inner = InstructCollator(qtok, tok, templates=templates, max_prompt_len=m.llm.max_prompt_len,
                                 max_txt_len=m.llm.max_txt_len, decoder_only=model.decoder_only,
                                 max_qformer_len=m.max_txt_len, generation=True)
        if task == "caption":  # the caption instruction, whatever task the sample was written for
            return (lambda samples: inner([dict(s, task="caption", question="") for s in samples])), gen
        return inner, gen
    if task == "vqa":
        return build_question_collator(cfg, model, tok, qtok, vqa_template(cfg, model.decoder_only),
                                       generation=True), gen
    if m.qformer_text_input:
        raise ValueError("--task caption: this model was fine-tuned to answer questions (model.qformer_text_input); "
                         "evaluate it with --task vqa")
    if model.decoder_only:
        return DecoderLMCollator(tok, prompt=m.llm.prompt, max_txt_len=m.llm.max_txt_len, generation=True), gen
    return T5PrefixCollator(tok, max_txt_len=m.llm.max_txt_len, prompt=m.llm.prompt, generation=True), gen
