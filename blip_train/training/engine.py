"""DeepSpeed engine construction: JSON template + experiment config → one consistent engine.

The template in ds_configs/ carries ZeRO/offload tuning; everything the experiment decides (batch
sizes, accumulation, precision, ZeRO stage, clipping) is injected here, and a template that says
otherwise is refused, so the JSON can never silently contradict the experiment.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from blip_train.config import ConfigError, ExperimentConfig
from blip_train.distributed.zero import is_zero3_param, partition_module_, zero_stage

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
_PRECISION_KEYS = {"bf16": "bf16", "fp16": "fp16"}
ENGINE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_ds_template(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"deepspeed.config: {name_or_path!r} is neither a file nor a template ({', '.join(known)})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON ({e})") from None


def build_ds_config(cfg: ExperimentConfig, world_size: int, on_cuda: bool) -> dict:
    """The DeepSpeed JSON for this run: template tuning + the experiment's decisions."""
    ds = copy.deepcopy(load_ds_template(cfg.deepspeed.config))
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum_steps * world_size
    if t.global_batch_size and t.global_batch_size != global_batch:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} != micro_batch_size {t.micro_batch_size} x "
            f"grad_accum_steps {t.grad_accum_steps} x world size {world_size} = {global_batch}")
    if _is_auto_adamw(ds.get("optimizer")):
        del ds["optimizer"]  # AdamW with every value "auto": the experiment's AdamW (optim.*) is that
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler"):
        # "auto" (JSONs written for the HF Trainer) leaves a value to the experiment, which decides it here.
        if key in ds and ds[key] != AUTO:
            raise ConfigError(f"deepspeed.config: the template sets {key!r}; that belongs to the experiment config "
                              "(train.*, optim.*) — remove it from the JSON or write \"auto\"")
    _refuse_auto(ds, cfg.deepspeed.config)
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum_steps
    ds["train_batch_size"] = global_batch
    ds["gradient_clipping"] = cfg.optim.grad_clip

    precision = cfg.deepspeed.precision
    for p, key in _PRECISION_KEYS.items():
        section = ds.setdefault(key, {})
        if section.get("enabled") == AUTO:
            del section["enabled"]
        if section.get("enabled") and p != precision:
            raise ConfigError(f"deepspeed.precision: {precision} contradicts the template {cfg.deepspeed.config!r}, "
                              f"which enables {p}; choose a matching template or precision")
        section["enabled"] = p == precision

    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == AUTO:
        del zero["stage"]
    if "stage" in zero and zero["stage"] != cfg.deepspeed.zero_stage:
        raise ConfigError(f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} contradicts the template "
                          f"{cfg.deepspeed.config!r}, which is tuned for ZeRO stage {zero['stage']}; choose a "
                          "matching template or zero_stage")
    zero["stage"] = cfg.deepspeed.zero_stage
    for key, value in (("stage3_param_persistence_threshold", cfg.deepspeed.param_persistence_threshold),
                       ("stage3_max_live_parameters", cfg.deepspeed.max_live_parameters),
                       ("stage3_max_reuse_distance", cfg.deepspeed.max_reuse_distance),
                       ("stage3_prefetch_bucket_size", cfg.deepspeed.prefetch_bucket_size)):
        if value >= 0:
            zero[key] = value
    apply_param_offload_(zero, cfg, on_cuda)
    for section in ("offload_param", "offload_optimizer"):
        if section in zero and not on_cuda:
            zero[section]["pin_memory"] = False  # pinning needs a CUDA host allocator
    if "offload_param" in zero or "offload_optimizer" in zero:
        # A client (torch) optimizer alongside offload: DeepSpeed would otherwise insist on its CPU Adam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if zero["stage"] != 3:
        for key in [k for k in zero if k.startswith("stage3_") or k == "offload_param"]:
            del zero[key]
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


AUTO = "auto"
_AUTO_DECIDED = {("train_batch_size",), ("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",),
                 ("gradient_clipping",), ("optimizer",), ("scheduler",), ("bf16", "enabled"), ("fp16", "enabled"),
                 ("zero_optimization", "stage")}
"""Where a template may say "auto": values the experiment config decides (batch, accumulation, clipping,
precision, ZeRO stage). An optimizer section is accepted only as AdamW with every value "auto" (it is then
the experiment's AdamW); a scheduler section is refused (the schedule is optim.*)."""


def _is_auto_adamw(section: object) -> bool:
    return (isinstance(section, dict) and str(section.get("type", "")).lower() in ("adam", "adamw")
            and set(section) <= {"type", "params"}
            and all(v == AUTO for v in (section.get("params") or {}).values()))


def _refuse_auto(ds: dict, template: str, path: tuple = ()) -> None:
    """Refuse "auto" anywhere the experiment config does not decide the value (ZeRO buckets, prefetch,
    optimizer hyperparameters...): the HF Trainer fills those from the model; here they are tuning the
    template must state."""
    for key, value in ds.items():
        where = path + (key,)
        if where[:1] in (("optimizer",), ("scheduler",)):
            continue  # refused as a whole unless "auto"
        if isinstance(value, dict):
            _refuse_auto(value, template, where)
        elif value == AUTO and where not in _AUTO_DECIDED:
            raise ConfigError(f"deepspeed.config: {template!r} sets {'.'.join(where)} to \"auto\", which only the "
                              "HF Trainer fills in; give a number (batch, accumulation, clipping, precision and ZeRO "
                              "stage may stay \"auto\": the experiment config decides them)")


def async_io_available() -> bool:
    """Whether DeepSpeed's async-I/O op (NVMe swapping) can be built here: it compiles against libaio."""
    import contextlib
    import io

    from deepspeed.ops.op_builder import AsyncIOBuilder

    with contextlib.redirect_stdout(io.StringIO()):  # the builder prints its probe
        return bool(AsyncIOBuilder().is_compatible(verbose=False))


NVME_MIN_BUFFERS = 16
"""Swap buffers of the NVMe parameter pool at least (each as large as the template's buffer_size)."""


def apply_param_offload_(zero: dict, cfg: ExperimentConfig, on_cuda: bool) -> None:
    """ZeRO-3 parameter offload from deepspeed.offload_frozen / offload_device / nvme_path, on top of the
    template's offload_param tuning (buffers, pinning); a template offloading elsewhere is refused, and
    NVMe is refused here, before any work, where DeepSpeed's async-I/O op cannot be built."""
    d = cfg.deepspeed
    param = zero.get("offload_param")
    template_device = (param or {}).get("device", "none")
    if template_device not in ("none", d.offload_device):
        raise ConfigError(f"deepspeed.offload_device: {d.offload_device} contradicts the template {d.config!r}, which "
                          f"offloads parameters to {template_device}; choose a matching template or offload_device")
    if d.offload_frozen:
        param = zero.setdefault("offload_param", {})
        param.update(device=d.offload_device, pin_memory=on_cuda)
    if d.offload_device != "nvme":
        return
    if param is None or param.get("device") != "nvme":
        raise ConfigError("deepspeed.offload_device: nvme offloads nothing without deepspeed.offload_frozen=true "
                          "(or an NVMe offload template such as zero3_offload_nvme)")
    if param.get("nvme_path") not in (None, d.nvme_path):
        raise ConfigError(f"deepspeed.nvme_path: the template {d.config!r} names {param['nvme_path']}; node paths "
                          "belong to the experiment config: remove it from the JSON")
    path = Path(d.nvme_path)
    if not (path.is_dir() and os.access(path, os.W_OK)):
        raise ConfigError(f"deepspeed.nvme_path: {d.nvme_path} is not a writable directory on this node")
    if not async_io_available():
        raise ConfigError("deepspeed.offload_device: nvme needs DeepSpeed's async-I/O op, which cannot be built "
                          "here (it compiles against libaio: apt install libaio-dev); use cpu")
    param["nvme_path"] = str(path)
    # DeepSpeed's NVMe prefetch asserts on a parameter a forward fetches twice (FlanT5's shared embedding, read
    # by its encoder and its decoder: "param N already assigned swap buffer id"); fetch on use instead.
    if d.prefetch_bucket_size > 0:
        raise ConfigError(f"deepspeed.prefetch_bucket_size: {d.prefetch_bucket_size} with NVMe offload; DeepSpeed's "
                          "NVMe prefetch fails on parameters read twice per forward: leave it at -1 (then 0)")
    zero["stage3_prefetch_bucket_size"] = 0
    # Both frozen towers swap through one pool of buffers (see distributed.zero.nvme_swapper_of); DeepSpeed's
    # default of 5 is fewer than the swappable tensors a reused, still-live LLM layer holds at once.
    param["buffer_count"] = max(int(param.get("buffer_count", 5)), NVME_MIN_BUFFERS)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norms (1-D), learned query tokens, video frame embeddings and the temperature are not regularised
    # toward zero.
    return (param.ndim < 2 or name.endswith(".bias") or "query_tokens" in name or name == "frame_pos"
            or name.endswith("temp"))


def lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """lr scale per parameter name under layer-wise decay: every submodule that defines
    `layer_decay_scales(decay)` (a training ViT) gives its own parameters' scales; all others get 1."""
    scales: dict[str, float] = {}
    if layer_decay == 1.0:
        return scales
    for prefix, module in model.named_modules():
        if hasattr(module, "layer_decay_scales"):
            for name, scale in module.layer_decay_scales(layer_decay).items():
                scales[f"{prefix}.{name}" if prefix else name] = scale
    return scales


def build_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups of the trainable parameters: decay / no_decay, split further by lr scale when layer-wise
    decay is on (each group carries `lr_scale`, which `apply_lr_` multiplies the scheduled lr by)."""
    scales = lr_scales(model, layer_decay)
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): [], (1.0, True): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        buckets.setdefault((scales.get(name, 1.0), _no_decay(name, p)), []).append(p)
    groups = []
    for (scale, no_decay), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        if not params and scale != 1.0:
            continue
        name = "no_decay" if no_decay else "decay"
        groups.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
                       "name": name if scale == 1.0 else f"{name}_lr_x{scale:.6g}"})
    return groups


def build_optimizer(model: nn.Module, cfg: ExperimentConfig, on_cuda: bool) -> torch.optim.Optimizer:
    o = cfg.optim
    # auto: fused on CUDA only, so CPU runs (tests, the demo) keep the numerics they were recorded with; on:
    # torch's fused kernel on either device (on a CPU it spares the step's full-size temporaries, as on a GPU).
    fused = o.fused == "on" or (on_cuda and o.fused == "auto")
    groups = build_param_groups(model, o.weight_decay, o.layer_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def lr_at(step: int, cfg: ExperimentConfig) -> float:
    """Linear warmup from warmup_start_lr to lr, then cosine from lr to min_lr at train.max_steps, or
    (optim.schedule=step) lr x decay_rate per decay_steps, floored at min_lr."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.warmup_start_lr + (o.lr - o.warmup_start_lr) * step / max(1, o.warmup_steps)
    if o.schedule == "step":
        return max(o.min_lr, o.lr * o.decay_rate ** ((step - o.warmup_steps) // o.decay_steps))
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def apply_lr_(optimizer: torch.optim.Optimizer, step: int, cfg: ExperimentConfig) -> float:
    """Set every param group's lr for optimizer step `step` (0-based: the steps done so far); returns it.

    The schedule is a function of the trainer's step counter, not a scheduler object that DeepSpeed
    steps: DeepSpeed skips the scheduler on an fp16 overflow step, which would leave the lr behind the
    step count for the rest of the run (and a resumed run would have to trust its saved state). A group
    may scale it by its own `lr_scale` (1 by default).
    """
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def assert_optimizer_holds_trainable(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer must hold exactly the trainable parameters: a frozen tower must never be stepped."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if in_opt != trainable:
        raise RuntimeError(f"optimizer holds {len(in_opt)} tensors but the model has {len(trainable)} trainable ones")


def cast_trainable_(model: nn.Module, dtype: torch.dtype) -> None:
    """Trainable parameters in the engine's dtype (DeepSpeed keeps their fp32 masters in the optimizer)."""
    for name, p in model.named_parameters():
        if not p.requires_grad or p.dtype == dtype:
            continue
        if is_zero3_param(p):
            raise RuntimeError(f"{name}: trainable but partitioned in {p.dtype} before the engine exists; "
                               "build trainable modules outside zero.Init")
        p.data = p.data.to(dtype)


def set_frozen_aside_(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Replace each frozen parameter's data by an empty tensor; returns the data, for `restore_frozen_`.

    deepspeed.initialize (ZeRO-0/1/2) casts every parameter to the engine's 16-bit dtype; the frozen
    towers keep the dtype their config asked for (model.vision.precision, model.llm.dtype). An empty
    stand-in has nothing to cast, move or broadcast (every rank loaded the same source weights), so no
    cast copy of a frozen LLM is ever made.
    """
    aside = {}
    for p in model.parameters():
        if not p.requires_grad:
            aside[p] = p.data
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return aside


def restore_frozen_(aside: dict[nn.Parameter, torch.Tensor], device: torch.device | None) -> None:
    """Put the set-aside data back, moved to `device` (None: where it was)."""
    for p, data in aside.items():
        p.data = data if device is None else data.to(device)


def build_engine(model: nn.Module, cfg: ExperimentConfig, world_size: int, on_cuda: bool,
                 extra_ds: dict | None = None, ds_config: dict | None = None):
    """(engine, its DeepSpeed config): deepspeed.initialize with a client AdamW; the lr schedule is
    applied by the loop (`apply_lr_`), the optimizer is `engine.optimizer`.

    Dtypes are decided here, not by DeepSpeed: trainable parameters take `deepspeed.precision`, frozen
    towers keep the dtype they were built in. `ds_config`: the JSON from `build_ds_config` when the
    caller built it already (to validate it before any process group exists); `extra_ds` is merged on
    top (e.g. universal-checkpoint loading).
    """
    import deepspeed

    ds_config = copy.deepcopy(ds_config) if ds_config is not None else build_ds_config(cfg, world_size, on_cuda)
    ds_config.update(extra_ds or {})
    cast_trainable_(model, ENGINE_DTYPES[cfg.deepspeed.precision])
    optimizer = build_optimizer(model, cfg, on_cuda)
    assert_optimizer_holds_trainable(model, optimizer)
    apply_lr_(optimizer, 0, cfg)
    aside: dict = {}
    if zero_stage(ds_config) == 3:
        partition_module_(model, ds_config)  # DeepSpeed does not recast a model that arrives partitioned
    else:
        aside = set_frozen_aside_(model)
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    except BaseException:
        restore_frozen_(aside, None)
        raise
    restore_frozen_(aside, engine.device)
    return engine, ds_config


def apply_parameter_bounds_(model: nn.Module) -> None:
    """Clamp the parameters a model names in `PARAMETER_BOUNDS` ({name: (low, high)}), in place, on the
    optimizer's fp32 master weights and on the working copy; call after each optimizer step.

    A model that clamps its own parameter before use (BLIP-2's temperature) edits only the working copy
    under DeepSpeed, and the master that the optimizer updates drifts out of range. All ranks call it
    together (under ZeRO-1/2 reading a master is an all-reduce). Clamping is elementwise, so under ZeRO-3
    each rank clamps its own partition (padding included, which nothing reads).
    """
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                                 safe_set_local_fp32_param)

    params = dict(model.named_parameters())
    for name, (low, high) in getattr(model, "PARAMETER_BOUNDS", {}).items():
        p = params[name]
        if not p.requires_grad:
            continue
        if is_zero3_param(p):
            if hasattr(p, "_z3_optimizer"):
                safe_set_local_fp32_param(p, safe_get_local_fp32_param(p).clamp(low, high))
            working = [p.ds_tensor] + ([p.data] if p.data.numel() else [])  # a persistent one is also whole
        else:
            master = safe_get_full_fp32_param(p)  # None when the optimizer updates the parameter itself
            if master is not None:
                safe_set_full_fp32_param(p, master.clamp(low, high))
            working = [p.data]
        with torch.no_grad():
            for t in working:
                t.clamp_(low, high)
