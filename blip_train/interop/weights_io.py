"""Our weights on disk: safetensors in our parameter names, single-file or sharded, with metadata.

A *weights folder* (what zero_to_safetensors, import_hf and import_lavis write, and what
`model.init_from` accepts):
    model.safetensors                                 or   model-00001-of-0000N.safetensors ...
                                                           model.safetensors.index.json   (HF's index format)
    blip_train_weights.json                           {"format": "blip_train.weights", "version": 1, "arch",
                                                       "contents", "dtype", "source", "config", ...}
A *single file* `X.safetensors` carries the same metadata as JSON under the header key "blip_train".

Tensors are written one shard at a time and may be lazy (anything with .shape, .dtype and
.contiguous(), such as DeepSpeed's gathered ZeRO-3 views), so a consolidation never holds more than
one shard beyond the optimizer states DeepSpeed itself loads. Outputs are written under a temporary
name next to the target and moved into place only when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch

META_FILE = "blip_train_weights.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FORMAT = "blip_train.weights"
VERSION = 1
HEADER_KEY = "blip_train"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class InteropError(ValueError):
    """Bad input to a conversion: the message is one line that names the file and the reason."""


def parse_size(text: Union[str, int]) -> int:
    """'5GB' (decimal, as HF's max_shard_size), '512MiB' (binary) or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).upper() not in _UNITS:
        raise InteropError(f"size {text!r}: expected a number with an optional unit (KB, MB, GB, MiB, GiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise InteropError(f"size {text!r} must be positive")
    return size


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise InteropError(f"dtype {name!r}: one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


# ------------------------------------------------------------------------------------------ outputs

def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite` (the tools' --overwrite)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)


def temp_path(out: Path) -> Path:
    """A sibling of `out` to build the output in (same filesystem, so the final move is a rename)."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp`; an old `out` is removed only after the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)


def discard(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A temporary sibling to build `out` in: moved into place when the body finishes, discarded if it fails,
    so `out` is never half-written."""
    tmp = temp_path(out)
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException:
        discard(tmp)
        raise


# ------------------------------------------------------------------------------------------ writing

def _nbytes(t: Any, dtype: Optional[torch.dtype]) -> int:
    target = dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype
    return int(torch.Size(t.shape).numel()) * torch.empty((), dtype=target).element_size()


def plan_shards(tensors: Mapping[str, Any], max_bytes: int, dtype: Optional[torch.dtype] = None) -> list[list[str]]:
    """Greedy split in key order (as HF's splitter); a tensor larger than max_bytes gets its own shard."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t, dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _materialize(t: Any, dtype: Optional[torch.dtype]) -> torch.Tensor:
    t = t.contiguous()  # lazy ZeRO-3 views gather here
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t.detach().cpu().contiguous()


def _save(tensors: dict[str, torch.Tensor], path: Path, header: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", **(header or {})})


def write_weights(tensors: Mapping[str, Any], out: Union[str, Path], meta: dict, *, overwrite: bool = False,
                  max_shard_size: Union[str, int] = "5GB", dtype: Optional[torch.dtype] = None,
                  progress: bool = False) -> list[Path]:
    """Write `tensors` (our names) to `out`: a `.safetensors` file (one file, metadata in its header) or a
    weights folder (sharded above max_shard_size, with index and blip_train_weights.json).

    Floating tensors are cast to `dtype` when given. Returns the written safetensors files.
    """
    from tqdm import tqdm

    out = Path(out)
    check_output(out, overwrite)
    meta = dict(meta, format=FORMAT, version=VERSION, num_tensors=len(tensors))
    if dtype is not None:
        meta["dtype"] = dtype_name(dtype)
    tmp = temp_path(out)
    try:
        if out.suffix == ".safetensors":
            shards = [list(tensors)]
            names = [out.name]
        else:
            shards = plan_shards(tensors, parse_size(max_shard_size), dtype)
            n = len(shards)
            names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            tmp.mkdir()
        bar = tqdm(total=len(tensors), desc=f"writing {out.name}", unit="tensor", disable=not progress,
                   dynamic_ncols=True)
        weight_map, total = {}, 0
        for keys, name in zip(shards, names):
            shard = {}
            for k in keys:
                shard[k] = _materialize(tensors[k], dtype)
                total += shard[k].numel() * shard[k].element_size()
                weight_map[k] = name
                bar.update(1)
            if out.suffix == ".safetensors":
                _save(shard, tmp, {HEADER_KEY: json.dumps(meta)})
            else:
                _save(shard, tmp / name)
            del shard
        bar.close()
        if out.suffix != ".safetensors":
            if len(names) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        move_into_place(tmp, out)
    except BaseException:
        discard(tmp)
        raise
    return [out] if out.suffix == ".safetensors" else [out / n for n in names]


# ------------------------------------------------------------------------------------------ reading

def is_weights_folder(path: Union[str, Path]) -> bool:
    return (Path(path) / META_FILE).is_file()


def is_weights_file(path: Union[str, Path]) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix in (".safetensors", ".pth", ".pt", ".bin")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise InteropError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def folder_files(folder: Path) -> list[Path]:
    """The safetensors files of a (possibly sharded) folder, in index order."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InteropError(f"{folder}: index names missing shards {missing[:3]}")
        return files
    raise InteropError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_weights(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors in our names, metadata) of a weights folder, a .safetensors file, or a .pth/.bin file."""
    from blip_train.models.eva_vit import read_state_dict

    p = Path(path)
    if p.is_dir():
        meta = json.loads((p / META_FILE).read_text()) if (p / META_FILE).is_file() else {}
        tensors: dict[str, torch.Tensor] = {}
        for f in folder_files(p):
            tensors.update(_read_safetensors(f)[0])
        return tensors, meta
    if not p.is_file():
        raise InteropError(f"{p}: no such file or folder")
    if p.suffix == ".safetensors":
        tensors, header = _read_safetensors(p)
        return tensors, json.loads(header[HEADER_KEY]) if HEADER_KEY in header else {}
    try:
        sd = read_state_dict(p)
    except Exception as e:  # a pickle that is not a state dict: name the file, not the unpickler's internals
        raise InteropError(f"{p}: not a readable torch state dict ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InteropError(f"{p}: not a flat state dict of tensors")
    return sd, {}


def group_prefixes(keys: Iterable[str]) -> list[str]:
    """Top-level module names of `keys` (for one-line summaries)."""
    return sorted({k.split(".", 1)[0] for k in keys})
