"""Evaluation every `eval.interval` steps inside training, on the live (ZeRO-3 partitioned) model.

Sharded over the ranks as standalone evaluation is: each rank evaluates its own whole batches and
the results are gathered. Under ZeRO-3 each module call is a collective, so every rank makes the
same number of calls in the same order (a rank with fewer batches repeats one and discards it;
decoding runs in lockstep). Parameters that the inference paths read outside a module forward
(query tokens, ITC temperature) are gathered here. Cap the cost with `eval.max_samples`.
Besides the scores, rank 0 gets examples to look at (examples.py): retrieval pictures, or a table of
generated captions / answers beside their references.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from blip_train.config import ExperimentConfig, eval_task
from blip_train.data.shared_memory import releasing_streaming_memory
from blip_train.distributed.zero import gathered


def evaluate_during_training(cfg: ExperimentConfig, model: nn.Module,
                             tokenizer: Any) -> tuple[dict[str, float], dict[str, np.ndarray | str]]:
    """(held-out metrics as flat `eval/...` scalars, the same on every rank; examples {tag: picture
    (H, W, 3) uint8 or markdown text} for `MetricLogger.log_examples`, on rank 0 only, empty elsewhere)."""
    from blip_train.evaluation import examples as ex
    from blip_train.evaluation.distributed import rank_world
    from blip_train.evaluation.generate import zero3_forward_context

    main = rank_world()[0] == 0
    was_training = model.training
    with releasing_streaming_memory():  # the split opens again at the next evaluation: keep nothing of it
        try:
            if eval_task(cfg) == "retrieval":
                from blip_train.evaluation.stage1_eval import evaluate_retrieval, load_retrieval_split

                split = load_retrieval_split(cfg.data.val, cfg.eval.max_samples)
                with gathered(model.eval_root_parameters()), zero3_forward_context(model):
                    m, preds = evaluate_retrieval(model, tokenizer, split, cfg.model.vision.image_size,
                                                  cfg.model.max_txt_len, k_test=cfg.eval.k_test,
                                                  batch_size=cfg.eval.batch_size,
                                                  predicted_images=ex.EXAMPLE_IMAGES)
                keys = ("txt_r1", "img_r1", "txt_r5", "img_r5", "r_mean")
                examples = ex.retrieval_examples(preds, split.read_image) if main else {}
            else:
                from blip_train.evaluation.generative_eval import evaluate_captions, evaluate_vqa, generation_setup

                task = eval_task(cfg)
                collate, gen = generation_setup(cfg, model, tokenizer, task)
                run = evaluate_vqa if task == "vqa" else evaluate_captions
                m, preds = run(model, collate, tokenizer, cfg, cfg.data.val, gen, max_samples=cfg.eval.max_samples)
                keys = ("vqa_accuracy", "exact_match") if task == "vqa" else ("cider", "bleu_4")
                table = ex.vqa_table if task == "vqa" else ex.caption_table
                examples = {f"eval_examples/{task}": table(preds)} if main else {}
        finally:
            model.train(was_training)
    return {f"eval/{k}": float(m[k]) for k in keys}, examples


def check_eval_split(cfg: ExperimentConfig) -> None:
    """Refuse, before any work, a data.val that in-training evaluation could not use (ConfigError).

    Evaluation runs first after `eval.interval` steps; a wrong split found then costs those steps.
    VQA needs rows with a question and answers (a captions-only split such as COCO Karpathy has none:
    evaluate InstructBLIP on it with eval.task=caption). Retrieval needs image ids that identify images
    (rows of one image_id with different captions are refused; rows of one image grouped, said once here).
    """
    with releasing_streaming_memory():
        _check_eval_split(cfg)


def _check_eval_split(cfg: ExperimentConfig) -> None:
    from streaming import StreamingDataset

    from blip_train.config import ConfigError
    from blip_train.data.shared_memory import build_streaming_dataset
    from blip_train.data.schema import SchemaError, verify_split
    from blip_train.evaluation.generative_eval import is_vqa_row

    try:
        n = verify_split(cfg.data.val)
    except SchemaError as e:
        raise ConfigError(f"data.val: {e}") from None
    if n == 0:
        raise ConfigError(f"data.val: {cfg.data.val} has no samples")
    if eval_task(cfg) == "retrieval":
        from blip_train.distributed.process_group import print0
        from blip_train.evaluation.stage1_eval import RetrievalSplitError, load_retrieval_split

        try:
            split = load_retrieval_split(cfg.data.val, cfg.eval.max_samples)
        except RetrievalSplitError as e:
            raise ConfigError(f"data.val: {e}") from None
        grouping = split.describe_grouping(f"data.val {cfg.data.val}")
        if grouping:
            print0(grouping)
    if eval_task(cfg) == "vqa":
        if cfg.eval.answer_list:
            from blip_train.evaluation.generative_eval import read_answer_list
            read_answer_list(cfg.eval.answer_list)
        ds = build_streaming_dataset(lambda: StreamingDataset(local=cfg.data.val, shuffle=False, batch_size=1))
        if not any(is_vqa_row(ds[i]) for i in range(ds.num_samples)):
            raise ConfigError(f"data.val: {cfg.data.val} has no VQA rows (task 'vqa' with a question and answers) "
                              f"for eval.task={cfg.eval.task}; set eval.task=caption or point data.val at a VQA split")
