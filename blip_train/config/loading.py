"""YAML → typed `ExperimentConfig`, `--set` overrides, and the resolved-config dump (validation: validate.py).

Everything here runs before any process group or model exists, so a bad key costs seconds, not a
queue slot. Errors are `ConfigError`s whose one-line message names the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from .schema import ExperimentConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A config problem, reported as one line naming the key."""


def resolve_recipe(path_or_name: str) -> Path:
    """A file path, or a recipe name like `demo/stage1` resolved under blip_train/recipes/."""
    candidates = [Path(path_or_name)]
    name = path_or_name if path_or_name.endswith((".yaml", ".yml")) else path_or_name + ".yaml"
    candidates.append(RECIPES_DIR / name)
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(str(p.relative_to(RECIPES_DIR))[:-5] for p in RECIPES_DIR.rglob("*.yaml"))
    raise ConfigError(f"config {path_or_name!r}: no such file and no such recipe (recipes: {', '.join(known)})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X], or a number that also takes a word (Union[int, str]: "auto")
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return _coerce(value, args[0], key)
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and key in _ON_OFF_KEYS:
            return "on" if value else "off"
        if isinstance(value, int) and not isinstance(value, bool) and key in _SIZE_KEYS:
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (allowed in {prefix or 'top level'}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict) -> ExperimentConfig:
    return _build(ExperimentConfig, data or {})


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    # YAML parsing gives numbers, booleans and lists their types; type checks happen in _build.
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}={raw}: not valid YAML ({_yaml_problem(e)}; quote the value, "
                          "e.g. --set \"data.train=[{local: dir}]\")") from None


def _yaml_problem(e: yaml.YAMLError, where: str = "") -> str:
    """PyYAML's error as one phrase: what went wrong and where (line and column, 1-based)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return problem
    return f"{problem} at {where + ':' if where else ''}line {mark.line + 1}, column {mark.column + 1}"


def load_config(path_or_name: str | None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load a recipe/YAML, apply `key=value` overrides, build and validate the typed tree."""
    data: dict = {}
    if path_or_name:
        path = resolve_recipe(path_or_name)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e, str(path))})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at top level")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r}: expected key=value")
        k, v = ov.split("=", 1)
        _set_dotted(data, k.strip(), v)
    cfg = config_from_dict(data)
    from .validate import validate_config  # validate.py imports ConfigError from here
    validate_config(cfg)
    return cfg


_ON_OFF_KEYS = {"optim.fused"}
"""String keys whose values include on/off, which YAML reads as booleans when unquoted."""
_SIZE_KEYS = {"data.cache_limit"}
"""String keys holding a size: a plain byte count (YAML reads it as an integer) or a number with a unit."""


def parse_cache_limit(value: str) -> int:
    """`data.cache_limit` in bytes, as streaming reads it (kb/mb/gb/tb count 1024s); 0 when empty."""
    from streaming.base.util import bytes_to_int

    if not value:
        return 0
    try:
        size = bytes_to_int(value)
    except ValueError:
        size = -1
    if size <= 0:
        raise ConfigError(f"data.cache_limit: {value!r} is not a size (a byte count, or a number with kb, mb, "
                          "gb or tb)")
    return size


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse an output directory that cannot be created or written (before any process group)."""
    p = Path(path)
    probe = p / f".write_test.{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.output_dir: {p} is not writable ({e.strerror or e})") from None


def save_resolved_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config (every default spelled out) next to a run's outputs."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)
