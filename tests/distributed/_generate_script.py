"""Run under torchrun (2 ranks, gloo): generation from a ZeRO-3 partitioned Blip2LLM.

Every parameter is partitioned (stage3_param_persistence_threshold 0). Each case generates twice:
on the same batch on both ranks, then on a rank-specific batch with a rank-specific length (rank 0
finishes first and must keep joining rank 1's forwards: synced_gpus); the token ids go to
OUT_DIR/rank{r}.json and the parent test compares them with the 1-rank, un-partitioned model.
    torchrun --nproc_per_node 2 tests/distributed/_generate_script.py OUT_DIR LLM_ROOT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from blip_train.evaluation.generate import generate_ids, needs_synced_gpus
from blip_train.models.llm_bridge import Blip2LLM, load_llm
from tests.unit.test_llm_bridge import bridge_config, make_batch

CASES = {  # name: (arch, llm kind, generate kwargs)
    "stage2_opt_beam": ("stage2", "opt", dict(num_beams=3, max_new_tokens=6, min_new_tokens=2)),
    "instruct_t5_greedy": ("instruct", "t5", dict(num_beams=1, max_new_tokens=6, repetition_penalty=1.5)),
}


def build_model(arch: str, llm_dir: Path) -> Blip2LLM:
    cfg = bridge_config(arch, str(llm_dir))
    torch.manual_seed(0)  # same weights on every rank and in the parent's reference
    return Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu")


def own_length(rank: int) -> int:
    return 3 + 4 * rank


def generation_inputs(arch: str, decoder_only: bool, seed: int) -> dict:
    batch = make_batch(bridge_config(arch), decoder_only, arch == "instruct", seed=seed)
    prompt = batch["llm_input_ids"][:, :2]
    batch.update(llm_input_ids=prompt, llm_attention_mask=torch.ones_like(prompt))
    del batch["llm_labels"]
    return batch


def main(out_dir: str, llm_root: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "steps_per_print": 10**9}
    result: dict = {"rank": rank}
    for name, (arch, kind, kwargs) in CASES.items():
        model = build_model(arch, Path(llm_root) / kind)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        module = engine.module.eval()
        partitioned = sum(1 for p in module.parameters() if p.numel() == 0)
        result[name] = {"partitioned": partitioned, "params": len(list(module.parameters())),
                        "synced": needs_synced_gpus(module)}
        for key, seed, extra in (("same", 5, {}), ("own", 100 + rank, {"max_new_tokens": own_length(rank)})):
            ids = generate_ids(module, generation_inputs(arch, module.decoder_only, seed), **{**kwargs, **extra})
            result[name][key] = ids.tolist()
        engine.destroy()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
