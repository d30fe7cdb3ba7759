"""Run under torchrun (1 or 2 ranks, gloo): in-training evaluation of a finished run's last weights.

Builds the model and the ZeRO-3 engine exactly as training does (run's resolved config), loads the
trainable weights of the run's last checkpoint before the engine casts them (as training's working
copy is the cast of its fp32 masters), then calls `evaluate_during_training`. Counts this rank's
module calls (text / image encoding, ITM, generate), records the per-sample
predictions of the generative tasks, evaluates once more to count the file descriptors and the
streaming segments each evaluation leaves open, and writes OUT_DIR/rank{r}.json.
    torchrun --nproc_per_node 2 tests/distributed/_in_training_eval_script.py RUN_DIR OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from blip_train.distributed.env import discover_environment, export_environment
from blip_train.distributed.process_group import destroy_distributed, init_distributed
from blip_train.distributed.world import build_world_info
from blip_train.distributed.zero import hf_zero3_loading
from blip_train.eval import load_run_config
from blip_train.evaluation import generative_eval
from blip_train.evaluation.in_training import evaluate_during_training
from blip_train.models.llm_bridge import llm_dtype
from blip_train.training.engine import build_ds_config, build_engine
from blip_train.training.stages import build_stage
from blip_train.training.weights import consolidate_trainable, load_trainable_

COUNTED = ("encode_text", "encode_image", "itm_scores", "generate")


def count_calls_(model, counts: dict) -> None:
    """Wrap the model's inference entry points so that each call (and its batch size) is counted."""
    for name in COUNTED:
        if not hasattr(model, name):
            continue
        method = getattr(model, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _method(*args, **kwargs)

        setattr(model, name, counted)


def record_predictions_(sink: dict) -> None:
    """Keep what the generative evaluations return besides the metrics (in_training drops it)."""
    for name in ("evaluate_captions", "evaluate_vqa"):
        fn = getattr(generative_eval, name)

        def recorded(*args, _fn=fn, **kwargs):
            metrics, predictions = _fn(*args, **kwargs)
            sink["predictions"] = [p["prediction"] for p in predictions]
            return metrics, predictions

        setattr(generative_eval, name, recorded)


def open_handles() -> tuple[int, list[str]]:
    """(this process's open file descriptors, the shared-memory segments it maps)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = sorted(line.split("/dev/shm/", 1)[1] for line in maps if "/dev/shm/" in line)
    return len(os.listdir("/proc/self/fd")), mapped


def main(run_dir: str, out_dir: str) -> None:
    cfg, ckpt_dir, tag = load_run_config(run_dir, [])
    env = discover_environment()
    export_environment(env)
    ds_config = build_ds_config(cfg, env.world_size, False)
    init_distributed(env, 5, on_cuda=False)
    hf_zero3 = None  # alive while the frozen LLM loads into partitions, as in training
    if cfg.model.arch != "stage1":
        hf_zero3 = hf_zero3_loading(ds_config, cfg.deepspeed.zero_init,  # noqa: F841
                                    dtype=llm_dtype(cfg.model.llm.dtype, "cpu"))
    stage = build_stage(cfg, build_world_info(), False)
    names = {n for n, p in stage.model.named_parameters() if p.requires_grad}
    load_trainable_(stage.model, consolidate_trainable(ckpt_dir, tag, names))
    engine, *_ = build_engine(stage.model, cfg, env.world_size, False, ds_config=ds_config)
    counts: dict = {}
    count_calls_(engine.module, counts)
    recorded: dict = {}
    record_predictions_(recorded)
    scores, _ = evaluate_during_training(cfg, engine.module, stage.tokenizer)
    out = {"rank": env.rank, "world_size": env.world_size, "step": int(tag.split("_")[-1]), "scores": scores,
           "calls": dict(counts), **recorded}
    after_first = open_handles()
    evaluate_during_training(cfg, engine.module, stage.tokenizer)  # the next `eval.interval` of a long run
    out["open_handles"] = [after_first, open_handles()]
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(out))
    destroy_distributed()  # a live gloo group at exit can abort the process


if __name__ == "__main__":
    main(*sys.argv[1:3])
