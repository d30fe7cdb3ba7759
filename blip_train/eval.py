"""Evaluation entry point; prints a table, then ONE JSON line of metrics (the last line).

    python -m blip_train.eval --task retrieval --checkpoint runs/demo/stage1 --data runs/demo/data/val
    torchrun --nproc_per_node 8 -m blip_train.eval --task retrieval --checkpoint RUN_OR_TAG_DIR --data DIR

--checkpoint is a run directory (its newest complete checkpoint is used), its checkpoints/ folder or
one step_* folder. The run's resolved config.yaml rebuilds the model; frozen towers come from their
recorded sources, trainable weights from the consolidated ZeRO shards. --untrained evaluates the
same model as initialised at step 0 (same seed), to show what training changed.

The whole split is evaluated unless --max-samples N is given (the run's eval.max_samples caps the
in-training monitor only). The model runs where the run trained: run.device (auto: cuda:LOCAL_RANK
when CUDA is available; --set run.device=cpu|cuda to choose). Under torchrun each rank evaluates its
share of whole batches; the numbers do not depend on the number of ranks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from blip_train.config import EVAL_TASK_ARCHS, ConfigError, config_from_dict, validate_config

TASKS = ("retrieval", "caption", "vqa")


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
    from blip_train.config.loading import _set_dotted
    from blip_train.training.weights import resolve_checkpoint

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    cfg_file = ckpt_dir.parent / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file}: missing (the run's resolved config is written there at start)")
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

    model, tok, _ = build_llm_stage_model(cfg, device_type=device.type)  # frozen dtypes for that device
    if not untrained:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        load_trainable_(model, consolidate_trainable(ckpt_dir, tag, names))
    model.to(device)
    collate, gen = generation_setup(cfg, model, tok, task)
    return model, collate, tok, gen


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
    try:
        cfg, ckpt_dir, tag = load_run_config(args.checkpoint, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"eval error: {e}", file=sys.stderr)
        return 2
    if cfg.model.arch not in EVAL_TASK_ARCHS[args.task]:
        print(f"eval error: --task {args.task} needs a run with model.arch in {EVAL_TASK_ARCHS[args.task]}; "
              f"{ckpt_dir.parent} is model.arch={cfg.model.arch}", file=sys.stderr)
        return 2
    from blip_train.dist.env import discover_environment, export_environment
    from blip_train.dist.process_group import destroy_distributed, init_distributed, is_main_process, print0
    from blip_train.evaluation.distributed import pick_eval_device

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
    if args.task == "retrieval":
        from blip_train.evaluation.stage1_eval import evaluate_retrieval
        from blip_train.training.stages import load_trained_stage1
        model, tokenizer = load_trained_stage1(cfg, ckpt_dir, tag, untrained=args.untrained, device_type=device.type)
        model.to(device)
        metrics, predictions = evaluate_retrieval(model, tokenizer, args.data, cfg.model.vision.image_size,
                                                  cfg.model.max_txt_len, k_test=cfg.eval.k_test,
                                                  batch_size=cfg.eval.batch_size, max_samples=args.max_samples)
    else:
        from blip_train.evaluation.generative_eval import evaluate_captions, evaluate_vqa
        model, collate, tok, gen = build_generative_eval(cfg, ckpt_dir, tag, args.task, args.untrained, device)
        run_task = evaluate_captions if args.task == "caption" else evaluate_vqa
        metrics, predictions = run_task(model, collate, tok, cfg, args.data, gen, max_samples=args.max_samples)
    metrics.update(task=args.task, checkpoint=str(ckpt_dir / tag), untrained=args.untrained,
                   max_samples=args.max_samples, device=str(device), world_size=env.world_size)
    if is_main_process():
        out = ckpt_dir.parent / "eval" / f"{args.task}{'_untrained' if args.untrained else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"metrics": metrics, "predictions": predictions}, indent=1))
        metrics["predictions_file"] = str(out)
    print0(f"{'metric':<22}value")
    for k, v in metrics.items():
        if isinstance(v, float):
            print0(f"{k:<22}{v:.2f}")
    print0(json.dumps(metrics))
    if env.world_size > 1:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
