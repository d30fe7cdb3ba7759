"""Evaluation entry point; prints a table, then ONE JSON line of metrics (the last line).

    python -m blip_train.eval --task retrieval --checkpoint runs/demo/stage1 --data runs/demo/data/val
    torchrun --nproc_per_node 8 -m blip_train.eval --task retrieval --checkpoint RUN_OR_TAG_DIR --data DIR

--checkpoint is a run directory (its newest complete checkpoint is used), its checkpoints/ folder or
one step_* folder. The config the checkpoint was saved under (config.yaml, or config.<n>.yaml after a
resume with a changed config) rebuilds the model; frozen towers come from their recorded sources,
trainable weights from the consolidated ZeRO shards. --untrained evaluates the same model as
initialised at step 0 (same seed), to show what training changed.

The whole split is evaluated unless --max-samples N is given (the run's eval.max_samples caps the
in-training monitor only). The model runs where the run trained: run.device (auto: cuda:LOCAL_RANK
when CUDA is available; --set run.device=cpu|cuda to choose). Under torchrun each rank evaluates its
share of whole batches; the numbers do not depend on the number of ranks.

Predictions go to <run>/eval/<task>_<split folder name>[_untrained].json. A --data that is not an MDS
split of our schema, a retrieval split whose image ids do not identify images, or a checkpoint with a
missing, truncated or corrupt file (every file is checked against its recorded size and CRC-32 before
the model is built) is refused in one line naming the file (exit 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from blip_train.config import EVAL_TASK_ARCHS, ConfigError, blip_task_refusal, config_from_dict, validate_config

TASKS = ("retrieval", "caption", "vqa")

METRIC_NAMES = {
    **{f"txt_r{k}": f"TR@{k}" for k in (1, 5, 10)}, **{f"img_r{k}": f"IR@{k}" for k in (1, 5, 10)},
    "txt_r_mean": "TR mean", "img_r_mean": "IR mean", "r_mean": "R mean (TR and IR)",
    "itc_txt_r1": "TR@1, ITC only", "itc_img_r1": "IR@1, ITC only",
    "chance_txt_r1": "TR@1 at chance", "chance_img_r1": "IR@1 at chance",
    "cider": "CIDEr-D", "bleu_4": "BLEU-4", "chance_cider": "CIDEr-D at chance",
    **{f"cider_{d}_domain": f"CIDEr-D {d}-domain" for d in ("in", "near", "out")},
    "vqa_accuracy": "VQA accuracy", "exact_match": "exact match", "chance_vqa_accuracy": "VQA accuracy at chance",
    "chance_exact_match": "exact match at chance",
}
"""The names papers and README use for the JSON keys (which other code reads and stay as they are)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m blip_train.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, or a step_* dir")
    p.add_argument("--data", required=True, help="MDS split to evaluate on")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--untrained", action="store_true", help="evaluate the step-0 model instead of the trained one")
    p.add_argument("--max-samples", type=int, default=0, metavar="N",
                   help="evaluate the first N images (retrieval, caption) or questions (vqa); default: the whole split")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_run_config(checkpoint: str, overrides: list[str]):
    """(config, checkpoints dir, tag) of --checkpoint: the config file its checkpoint was saved under."""
    from blip_train.config.changes import config_file_for
    from blip_train.config.loading import _set_dotted
    from blip_train.training.weights import resolve_checkpoint

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    cfg_file = config_file_for(ckpt_dir, tag)
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file}: missing (the config {ckpt_dir / tag} was saved under)")
    data = yaml.safe_load(cfg_file.read_text())
    for ov in overrides:
        k, _, v = ov.partition("=")
        _set_dotted(data, k.strip(), v)
    cfg = config_from_dict(data)
    validate_config(cfg)
    return cfg, ckpt_dir, tag


def build_generative_eval(cfg, ckpt_dir: Path, tag: str, task: str, untrained: bool, device: torch.device):
    """(model on `device`, collate, tokenizer, generation kwargs) for --task caption|vqa on a stage-2/instruct run."""
    from blip_train.evaluation.generative_eval import generation_setup
    from blip_train.training.stages import build_llm_stage_model
    from blip_train.training.weights import consolidate_trainable, load_trainable_

    if cfg.model.arch == "blip":
        from blip_train.training.stages import build_blip_model
        # Trained weights replace model.init_from's, so it is not read (nor needed) unless untrained.
        model, tok = build_blip_model(cfg if untrained else replace(cfg, model=replace(cfg.model, init_from="")))
    else:
        model, tok, _ = build_llm_stage_model(cfg, device_type=device.type)  # frozen dtypes for that device
    if not untrained:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        load_trainable_(model, consolidate_trainable(ckpt_dir, tag, names))
    model.to(device)
    collate, gen = generation_setup(cfg, model, tok, task)
    return model, collate, tok, gen


def print_table(metrics: dict) -> None:
    """The metrics as people read them (TR@1, CIDEr-D, ...), beside their JSON keys, on rank 0."""
    from blip_train.distributed.process_group import print0

    print0(f"{'metric':<26}{'value':>8}  JSON key")
    for k, v in metrics.items():
        if isinstance(v, float):
            print0(f"{METRIC_NAMES.get(k, k):<26}{v:>8.2f}  {k}")
    if "txt_r1" in metrics:
        print0("TR@K: image->text, an image's own caption among its top K; IR@K: text->image, a caption's image "
               "among its top K (%)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"eval error: --data {args.data}: not a directory", file=sys.stderr)
        return 2
    if args.max_samples < 0:
        print(f"eval error: --max-samples {args.max_samples}: must be >= 0 (0: the whole split)", file=sys.stderr)
        return 2
    if any(ov.partition("=")[0].strip() == "eval.max_samples" for ov in args.overrides):
        # It caps the in-training monitor; a silent cap here would turn a 5k test into a 1k one.
        print("eval error: --set eval.max_samples: evaluation uses the whole split; pass --max-samples N to cap it",
              file=sys.stderr)
        return 2
    from blip_train.training.checkpoint import CheckpointError

    try:
        cfg, ckpt_dir, tag = load_run_config(args.checkpoint, args.overrides)  # files verified here
    except (ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"eval error: {e}", file=sys.stderr)
        return 2
    if cfg.model.arch not in EVAL_TASK_ARCHS[args.task]:
        print(f"eval error: --task {args.task} needs a run with model.arch in {EVAL_TASK_ARCHS[args.task]}; "
              f"{ckpt_dir.parent} is model.arch={cfg.model.arch}", file=sys.stderr)
        return 2
    refusal = blip_task_refusal(cfg.model.objective, args.task) if cfg.model.arch == "blip" else ""
    if refusal:
        print(f"eval error: --task {args.task}: {ckpt_dir.parent}: {refusal}", file=sys.stderr)
        return 2
    if cfg.eval.answer_list:
        from blip_train.evaluation.generative_eval import read_answer_list
        try:
            read_answer_list(cfg.eval.answer_list)
        except ConfigError as e:
            print(f"eval error: {e}", file=sys.stderr)
            return 2
    if args.task == "caption" and cfg.model.arch == "stage2" and cfg.model.qformer_text_input:
        print(f"eval error: --task caption: {ckpt_dir.parent} is fine-tuned to answer questions "
              "(model.qformer_text_input=true); use --task vqa", file=sys.stderr)
        return 2
    from blip_train.data.schema import SchemaError, verify_split

    try:
        verify_split(args.data)
    except SchemaError as e:
        print(f"eval error: --data {e}", file=sys.stderr)
        return 2
    from blip_train.distributed.env import discover_environment, export_environment
    from blip_train.distributed.process_group import destroy_distributed, init_distributed, is_main_process, print0
    from blip_train.evaluation.distributed import pick_eval_device
    from blip_train.evaluation.stage1_eval import RetrievalSplitError

    env = discover_environment()
    export_environment(env)
    try:
        device = pick_eval_device(cfg.run.device, env.local_rank,
                                  torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ConfigError as e:
        print(f"eval error: {e}", file=sys.stderr)
        return 2
    if env.world_size > 1:  # NCCL on CUDA, gloo on the CPU (also on a GPU node with run.device=cpu)
        init_distributed(env, cfg.deepspeed.timeout_minutes, on_cuda=device.type == "cuda")
    try:
        metrics = evaluate(args, cfg, ckpt_dir, tag, device)
        print_table(metrics)  # on rank 0, which is known while the group lives
        print0(json.dumps(metrics))
    except RetrievalSplitError as e:  # the same on every rank: said once
        if is_main_process():
            print(f"eval error: {e}", file=sys.stderr)
        return 2
    finally:
        if env.world_size > 1:
            destroy_distributed()
    return 0


def evaluate(args: argparse.Namespace, cfg, ckpt_dir: Path, tag: str, device: torch.device) -> dict:
    """Run --task on --data with the run's model on `device` (all ranks together); write the predictions
    (rank 0) and return the metrics, with what was evaluated and where the predictions are."""
    from blip_train.distributed.process_group import is_main_process, print0
    from blip_train.evaluation.distributed import rank_world

    if args.task == "retrieval":
        from blip_train.evaluation.stage1_eval import evaluate_retrieval, load_retrieval_split
        from blip_train.training.stages import load_trained_retrieval_model

        split = load_retrieval_split(args.data, args.max_samples)  # refused before the model is built
        grouping = split.describe_grouping(args.data)
        if grouping:
            print0(grouping)
        model, tokenizer = load_trained_retrieval_model(cfg, ckpt_dir, tag, untrained=args.untrained, device_type=device.type)
        model.to(device)
        metrics, predictions = evaluate_retrieval(model, tokenizer, split, cfg.model.vision.image_size,
                                                  cfg.model.max_txt_len, k_test=cfg.eval.k_test,
                                                  batch_size=cfg.eval.batch_size, progress=True)
    else:
        from blip_train.evaluation.generative_eval import evaluate_captions, evaluate_vqa
        model, collate, tok, gen = build_generative_eval(cfg, ckpt_dir, tag, args.task, args.untrained, device)
        run_task = evaluate_captions if args.task == "caption" else evaluate_vqa
        metrics, predictions = run_task(model, collate, tok, cfg, args.data, gen, max_samples=args.max_samples,
                                        progress=True)
    data = Path(args.data).resolve()
    metrics.update(task=args.task, checkpoint=str(ckpt_dir / tag), untrained=args.untrained, data=str(data),
                   max_samples=args.max_samples, device=str(device), world_size=rank_world()[1])
    if is_main_process():
        # One file per task and split: evaluating a second split does not overwrite the first.
        out = ckpt_dir.parent / "eval" / f"{args.task}_{data.name}{'_untrained' if args.untrained else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"metrics": metrics, "predictions": predictions}, indent=1))
        metrics["predictions_file"] = str(out)
    return metrics


if __name__ == "__main__":
    sys.exit(main())
