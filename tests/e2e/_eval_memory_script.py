"""Peak RSS of caption and then VQA evaluation over one split, in a fresh process (test_eval_memory.py).

    python tests/e2e/_eval_memory_script.py CONFIG_YAML SPLIT

Builds the config's model (no checkpoint: the evaluation's memory does not depend on the weights),
evaluates the whole split with each task and prints one JSON line: per task the samples evaluated
and ru_maxrss (the process's peak so far) in MiB after it.
"""
from __future__ import annotations

import json
import resource
import sys


def main() -> None:
    config, split = sys.argv[1:3]
    from blip_train.config.loading import load_config
    from blip_train.evaluation.generative_eval import evaluate_captions, evaluate_vqa, generation_setup
    from blip_train.training.stages import build_llm_stage_model

    cfg = load_config(config)
    model, tok, _ = build_llm_stage_model(cfg, device_type="cpu")
    out = {}
    for task, run, count in (("caption", evaluate_captions, "num_images"), ("vqa", evaluate_vqa, "num_questions")):
        collate, gen = generation_setup(cfg, model, tok, task)
        metrics, _ = run(model, collate, tok, cfg, split, gen, max_samples=0)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        out[task] = {"samples": metrics[count], "peak_rss_mib": round(peak_mib, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
