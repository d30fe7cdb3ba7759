"""peft adapters and ZeRO-3's zero.Init: injected after a partitioned load they are whole and initialised
(B = 0); injected inside zero.Init peft's initialisation never reaches the partitions, which apply_lora_
refuses. Prints one JSON line.

usage: torchrun --nproc_per_node 1 tests/distributed/_lora_zero_init_script.py LLM_FOLDER
"""
import json
import sys

import deepspeed
import torch

from blip_train.config.schema import LoRAConfig
from blip_train.distributed.env import discover_environment, export_environment
from blip_train.distributed.process_group import init_distributed
from blip_train.distributed.zero import hf_zero3_loading
from blip_train.models.lora import apply_lora_


def main():
    from transformers import AutoModelForCausalLM

    env = discover_environment()
    export_environment(env)
    init_distributed(env, 5)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    keep = hf_zero3_loading(ds, True, torch.bfloat16)  # noqa: F841
    cfg = LoRAConfig(r=4, alpha=8.0)
    out = {}
    llm = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).requires_grad_(False)
    out["base_partitioned"] = all(hasattr(p, "ds_id") for p in llm.parameters())
    apply_lora_(llm, cfg)
    lora = {n: p for n, p in llm.named_parameters() if ".lora_" in n}
    out["after_load_whole"] = bool(lora) and not any(hasattr(p, "ds_id") for p in lora.values())
    out["after_load_b_zero"] = all(p.abs().sum().item() == 0 for n, p in lora.items() if ".lora_B." in n)
    llm2 = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).requires_grad_(False)
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            apply_lora_(llm2, cfg)
        out["inside_zero_init"] = "accepted"
    except RuntimeError as e:
        out["inside_zero_init"] = str(e)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
