"""What a run records of its config, and which changes a resumed run may make.

A run writes its resolved config once (`config.yaml`); a resumed run that uses a different config
writes it beside the earlier ones (`config.1.yaml`, `config.2.yaml`, ...), never over them, so every
config a run used is kept. A checkpoint records the file it was saved under (`config_file` in its
`complete.json`), so tools read the config that produced it.

Changing what a run means (model, data, optimizer, schedule, batch) between its first start and a
resume is refused unless asked for: the resumed run would silently mix two experiments. Keys that
only change how a run executes or reports (logging, saving, evaluation, workers, memory savers,
attention kernels) may change freely.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml

from .loading import ConfigError, config_from_dict, config_to_dict, save_resolved_config
from .schema import ExperimentConfig

CONFIG_FILE = "config.yaml"
_NUMBERED = re.compile(r"^config\.(\d+)\.yaml$")

RESUME_FREE = (
    "run.output_dir", "run.tensorboard", "run.wandb", "run.device", "run.memory_trace",
    "train.log_interval", "train.save_interval", "train.keep_last", "train.keep_every", "train.max_bad_steps",
    "eval.", "data.val", "data.num_workers", "data.decode", "data.cache_dir", "data.cache_limit", "data.keep_cache",
    "deepspeed.config", "deepspeed.offload", "deepspeed.nvme", "deepspeed.param_persistence_threshold",
    "deepspeed.max_live_parameters", "deepspeed.max_reuse_distance", "deepspeed.prefetch_bucket_size",
    "deepspeed.zero_init", "deepspeed.timeout_minutes",
    "model.attention", "model.vision.grad_checkpointing", "model.qformer.grad_checkpointing", "optim.fused",
)
"""Keys (or key prefixes ending in '.') a resumed run may change: how it runs and reports, not what it learns."""

BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum_steps", "train.global_batch_size")
"""Compared through the global batch they make (micro x accumulation x ranks), which a resume on another
number of ranks keeps by changing the accumulation."""


def config_files(run_dir: str | Path) -> list[Path]:
    """The configs a run used, oldest first: config.yaml, config.1.yaml, config.2.yaml, ..."""
    run = Path(run_dir)
    numbered = sorted((int(m.group(1)), p) for p in run.glob("config.*.yaml") if (m := _NUMBERED.match(p.name)))
    first = [run / CONFIG_FILE] if (run / CONFIG_FILE).is_file() else []
    return first + [p for _, p in numbered]


def read_config_dict(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    return data


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}  # lists (data.train) compare as one value


def _resolved(data: dict) -> dict:
    """A recorded config with today's defaults filled in (a key added since then is not a change)."""
    try:
        return config_to_dict(config_from_dict(data))
    except ConfigError:
        return data  # written by another version of the schema: compare what is there


def _free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_FREE)


def meaning_changes(recorded: dict, cfg: ExperimentConfig) -> list[str]:
    """'key: old -> new' for every key whose change alters what the run means (batch keys excluded)."""
    old, new = _flatten(_resolved(recorded)), _flatten(config_to_dict(cfg))
    out = []
    for key in sorted(set(old) | set(new)):
        if _free(key) or key in BATCH_KEYS or old.get(key) == new.get(key):
            continue
        out.append(f"{key}: {_short(old.get(key, '(absent)'))} -> {_short(new.get(key, '(absent)'))}")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, str) else value or "''"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_resume_config(run_dir: str | Path, cfg: ExperimentConfig, saved_global_batch: Optional[int],
                        global_batch: int, allow: bool) -> list[str]:
    """Compare a resumed run's config with the one it last recorded. Returns the meaning changes (empty:
    none); raises ConfigError listing them unless `allow`."""
    files = config_files(run_dir)
    if not files:
        return []
    changes = meaning_changes(read_config_dict(files[-1]), cfg)
    if saved_global_batch is not None and saved_global_batch != global_batch:
        changes.append(f"global batch (train.micro_batch_size x grad_accum_steps x ranks): {saved_global_batch} -> "
                       f"{global_batch}")
    if changes and not allow:
        raise ConfigError(f"{run_dir}: resuming with a config that changes what the run means ({'; '.join(changes)}) "
                          f"vs {files[-1].name}; use a new run.output_dir, or pass --allow-config-change to continue "
                          "with the new values")
    return changes


def record_config(cfg: ExperimentConfig, run_dir: str | Path) -> Path:
    """Write the resolved config as config.yaml, or as the next config.<n>.yaml when it differs from the
    newest one recorded; never over an earlier one. Returns the file that describes the run from now on."""
    run = Path(run_dir)
    files = config_files(run)
    if not files:
        path = run / CONFIG_FILE
    else:
        if _flatten(read_config_dict(files[-1])) == _flatten(config_to_dict(cfg)):
            return files[-1]
        m = _NUMBERED.match(files[-1].name)
        path = run / f"config.{int(m.group(1)) + 1 if m else 1}.yaml"
    save_resolved_config(cfg, path)
    return path


def config_file_for(ckpt_dir: str | Path, tag: str) -> Path:
    """The config a checkpoint was saved under: the file its complete.json names, else config.yaml
    (checkpoints written before configs were numbered)."""
    import json

    run = Path(ckpt_dir).parent
    marker = Path(ckpt_dir) / tag / "complete.json"
    name = json.loads(marker.read_text()).get("config_file") if marker.is_file() else None
    return run / (name or CONFIG_FILE)
