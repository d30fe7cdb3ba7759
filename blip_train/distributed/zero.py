"""ZeRO-3 helpers that are no-ops when parameters are not partitioned.

Code that reads weights outside a forward (generation's query tokens, exports, init copies) wraps the
read in `gathered(...)` and runs unchanged under ZeRO-0/1/2, on one CPU rank, and under ZeRO-3.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

ParamsOrModule = Union[nn.Module, nn.Parameter, torch.Tensor, Iterable[torch.Tensor]]


def is_zero3_param(p: torch.Tensor) -> bool:
    """A parameter partitioned by deepspeed.zero.Init / ZeRO-3 carries a `ds_id`."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    """Element count of the whole parameter (a partitioned one holds an empty local tensor)."""
    return int(p.ds_numel) if is_zero3_param(p) else p.numel()


def _as_param_list(params_or_module: ParamsOrModule) -> List[torch.Tensor]:
    if isinstance(params_or_module, nn.Module):
        return list(params_or_module.parameters())
    if isinstance(params_or_module, torch.Tensor):
        return [params_or_module]
    return list(params_or_module)


def gathered(params_or_module: ParamsOrModule, modifier_rank: Optional[int] = None) -> ContextManager[Any]:
    """Inside the context the full parameters are visible on every rank.

    `modifier_rank`: the rank whose in-place writes are kept (broadcast and re-partitioned on exit);
    None means read-only. Must be entered by all ranks together under ZeRO-3 (it is a collective).
    """
    params = _as_param_list(params_or_module)
    partitioned = [p for p in params if is_zero3_param(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed  # deferred: only ZeRO-3 runs need it here

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def zero_stage(ds_config: Dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def maybe_zero_init(enabled: bool, ds_config: Dict[str, Any], param_swapper: Any = None) -> ContextManager[Any]:
    """`deepspeed.zero.Init` when asked for and the config is ZeRO-3, else a no-op context.

    Modules built inside are partitioned at construction, so a model larger than one GPU never
    exists whole. Build frozen parts in their final dtype inside it: `.to(dtype)` afterwards fails.
    Needs the process group (or the env:// variables) to exist already.
    """
    if not enabled or zero_stage(ds_config) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config, param_swapper=param_swapper)


def nvme_swapper_of(module: nn.Module) -> Any:
    """The NVMe parameter swapper a partitioned module's parameters use, or None.

    A zero.Init context with NVMe offload starts a swapper that empties its swap folder, and DeepSpeed swaps
    a fetched group of parameters in through the first one's swapper: a second tower (the ViT after
    transformers has loaded the LLM) must be built with the first tower's swapper (`maybe_zero_init`'s
    param_swapper), or it deletes the first tower's swap files and the forward fails reading them.
    """
    return next((p.nvme_swapper for p in module.parameters() if getattr(p, "nvme_swapper", None) is not None), None)


def with_precision(ds_config: dict, dtype: torch.dtype) -> dict:
    """A copy of `ds_config` whose bf16/fp16 switches say `dtype` (fp32: both off).

    zero.Init takes the dtype it builds in from these switches; a frozen tower that must be built in
    its own dtype (an fp32 FlanT5 next to a bf16 Q-Former) is built under such a copy.
    """
    out = dict(ds_config)
    for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        out[key] = {**ds_config.get(key, {}), "enabled": on}
    return out


def hf_zero3_loading(ds_config: dict, enabled: bool, dtype: Optional[torch.dtype] = None):
    """Make transformers' `from_pretrained` load straight into ZeRO-3 partitions (returns the handle to keep).

    transformers checks a module-level weak reference to an `HfDeepSpeedConfig`: while the returned
    object is alive, a frozen 13B LLM is partitioned as it loads instead of materialising whole on every
    rank. transformers builds under zero.Init with the config's precision, so `dtype` (the frozen LLM's
    own, `model.llm.dtype`) is written into the copy it sees. Returns None (normal loading) unless
    `enabled` and the config is ZeRO stage 3.
    """
    if not enabled or zero_stage(ds_config) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(with_precision(ds_config, dtype) if dtype is not None else ds_config)


def partition_module_(module: nn.Module, ds_config: Dict[str, Any]) -> None:
    """Partition every not-yet-partitioned parameter of a built module as ZeRO-3 would, keeping dtypes.

    DeepSpeed casts every parameter of a model it has not seen partitioned to the engine's 16-bit
    dtype; one that arrives partitioned keeps the dtypes its parts were built in. Offload placement
    comes from the config, as in DeepSpeed's own conversion. A collective: all ranks call it.
    """
    import deepspeed

    params = list(module.parameters())
    whole = [p for p in params if not is_zero3_param(p)]
    partitioned = [p for p in params if is_zero3_param(p)]
    if not whole:
        return
    if partitioned:  # join the partitioning context of the parts built under zero.Init (e.g. the LLM)
        partitioned[0].convert_to_zero_parameters(param_list=whole)
    else:
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
