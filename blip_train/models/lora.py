"""LoRA adapters on the frozen LLM (peft), trained with the Q-Former while the base weights stay frozen.

Adapters are injected in place (`peft.inject_adapter_in_model`) AFTER the base weights are loaded: under
ZeRO-3 the base LLM is partitioned as it loads (zero.Init through HfDeepSpeedConfig), and peft only needs
each target Linear's `in_features` / `out_features` attributes to build an adapter, never its (empty,
partitioned) weight. The adapters are built whole on every rank from the same seed, then partitioned with
the other trainable modules when the engine is built (`partition_module_`).

Injecting them inside zero.Init instead goes wrong silently (seen with deepspeed 0.19.8 + peft 0.21.0):
each new lora_A / lora_B Linear is partitioned as soon as it is constructed, so peft's own initialisation
afterwards (kaiming for A, zeros for B) runs on empty local tensors and does nothing ("Initializing
zero-element tensors is a no-op"). B keeps nn.Linear's random init instead of zeros, so the "untrained"
adapter already changes the LLM's output at step 0. `apply_lora_` refuses adapters that arrive partitioned.

Names: peft moves each adapted Linear under `.base_layer` and adds `.lora_A.default` / `.lora_B.default`,
so the frozen `llm.model...q_proj.weight` is `llm.model...q_proj.base_layer.weight` in our model. A target
Linear computes base(x) + (alpha / r) * B(A(dropout(x))); B starts at zero, so an untrained adapter changes
nothing.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from blip_train.config.schema import LoRAConfig

ADAPTER = "default"
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def peft_lora_config(cfg: LoRAConfig):
    """The peft LoraConfig for `cfg`; empty target_modules leaves the choice to peft's table for the
    architecture (query and value projections for OPT, LLaMA and T5)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules) or None, bias="none")


def apply_lora_(llm: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Inject LoRA adapters into the loaded, frozen `llm` in place (nothing when cfg.r == 0); returns the
    names of the adapted modules. The base weights stay frozen; the adapters require grad."""
    if cfg.r == 0:
        return []
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(peft_lora_config(cfg), llm, adapter_name=ADAPTER)
    except ValueError as e:  # e.g. no module matches target_modules, or peft knows no default for the model
        raise ValueError(f"model.llm.lora.target_modules: {str(e).splitlines()[0]}") from None
    adapted = sorted(n for n, m in llm.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    not_linear = [n for n in adapted if not isinstance(llm.get_submodule(n).base_layer, nn.Linear)]
    if not_linear:  # embeddings / convolutions name their adapters otherwise; export merges Linear ones only
        raise ValueError(f"model.llm.lora.target_modules: only Linear layers can carry adapters, not {not_linear[:3]}")
    if not adapted:
        raise ValueError(f"model.llm.lora.target_modules: {cfg.target_modules or 'the default'} matched no Linear "
                         "layer of the LLM")
    # `ds_id` marks a ZeRO-3 partition (read by name: models never import deepspeed).
    if any(hasattr(p, "ds_id") for n, p in llm.named_parameters() if ".lora_" in n):
        raise RuntimeError("LoRA adapters were built inside deepspeed.zero.Init: peft's initialisation (B = 0) "
                           "did not reach their partitions; inject them after the LLM is loaded, outside zero.Init")
    return adapted


def set_lora_dropout_mode_(llm: nn.Module, training: bool) -> None:
    """Adapter dropout follows the trainer's mode while the frozen base LLM stays in eval mode (`freeze_`
    forces its modules to eval on every `.train()`, the adapters' dropout included)."""
    for m in llm.modules():
        dropouts = getattr(m, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for d in dropouts.values():
                d.training = training


def is_lora_key(name: str) -> bool:
    return LORA_KEY.match(name) is not None


def base_name(name: str) -> str:
    """Our name of a frozen LLM weight -> its name in the plain HF model (peft's `.base_layer` removed)."""
    return name.replace(".base_layer.", ".")


def merge_lora_(base: dict[str, torch.Tensor], lora: Mapping[str, torch.Tensor], cfg: LoRAConfig) -> list[str]:
    """Fold adapters into the base weights in place: W <- W + (alpha / r) * B @ A, computed in fp32 and
    stored back in W's dtype. `base`: the plain HF LLM state dict; `lora`: adapter weights named relative to
    the LLM (`<module>.lora_A.default.weight`). Returns the merged base keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in lora.items():
        m = LORA_KEY.match(name)
        if m is None:
            raise KeyError(f"{name}: not a LoRA adapter weight")
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = t
    scale = cfg.alpha / cfg.r
    merged = []
    for module, ab in sorted(pairs.items()):
        key = f"{module}.weight"
        if set(ab) != {"A", "B"} or key not in base:
            raise KeyError(f"LoRA merge: {module} lacks lora_A/lora_B or its base weight {key}")
        w = base[key]
        delta = ab["B"].float() @ ab["A"].float()  # (out, r) @ (r, in) -> (out, in)
        base[key] = (w.float() + scale * delta).to(w.dtype)
        merged.append(key)
    return merged


def peft_adapter_state(lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter weights in the layout peft saves (`adapter_model.safetensors`): `base_model.model.` + the
    module path relative to the LLM, adapter name dropped."""
    out = {}
    for name, t in lora.items():
        m = LORA_KEY.match(name)
        if m is None:
            raise KeyError(f"{name}: not a LoRA adapter weight")
        out[f"base_model.model.{m.group('module')}.lora_{m.group('ab')}.weight"] = t.contiguous()
    return out
