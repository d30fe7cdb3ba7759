"""CapFilt over a whole split on every rank: chunked, resumable, merged in input order.

The input's indices are cut into fixed chunks of `chunk_size` samples (chunk k = indices
[k*chunk_size, (k+1)*chunk_size)). A chunk's output is an MDS split `OUT/.parts/chunk_KKKKKK` plus a
completion marker `chunk_KKKKKK.json` (its counters and histograms), written after the part; so a
marker exists only for a complete part. A chunk's rows depend only on the settings and the chunk
(its sampling generator is seeded from (seed, k)), never on the rank or world size that ran it:

* ranks share the chunks still missing round-robin, so 1 rank and N ranks give identical output;
* a restarted run (any world size, same arguments) skips chunks with a marker;
* rank 0 finally merges the parts in chunk order into OUT (atomically: write_split's temp + rename,
  which also removes `.parts`) and writes OUT/capfilt_report.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from blip_train.capfilt.capfilt import EXTRA_COLUMNS, Captioner, CapFiltSettings, process_chunk
from blip_train.capfilt.report import CapFiltStats, build_report
from blip_train.data.schema import split_num_samples, verify_split, write_split

PARTS_DIR = ".parts"
SETTINGS_FILE = "settings.json"
REPORT_FILE = "capfilt_report.json"


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of chunk `chunk`'s sampling generator: a hash, so nearby (seed, chunk) pairs do not correlate."""
    return int.from_bytes(hashlib.sha256(f"capfilt-{seed}-{chunk}".encode()).digest()[:8], "little") >> 1


def num_chunks(num_samples: int, chunk_size: int) -> int:
    return (num_samples + chunk_size - 1) // chunk_size


def part_dir(out: Path, chunk: int) -> Path:
    return out / PARTS_DIR / f"chunk_{chunk:06d}"


def marker_file(out: Path, chunk: int) -> Path:
    return out / PARTS_DIR / f"chunk_{chunk:06d}.json"


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def prepare_output(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Create OUT/.parts for a new run, or accept it for a resumed run with the same `identity`.

    A finished split or foreign content at OUT is refused unless `overwrite`. A partial run with
    other settings is refused too (resuming it would mix two outputs), unless `overwrite`.
    """
    parts = out / PARTS_DIR
    if out.exists():
        partial = (parts / SETTINGS_FILE).is_file() and not (out / "index.json").exists()
        if partial:
            old = json.loads((parts / SETTINGS_FILE).read_text())
            if old == identity:
                return
            changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            if not overwrite:
                raise ValueError(f"{out} holds an unfinished CapFilt run with other settings ({', '.join(changed)}); "
                                 "re-run with its arguments to resume it, or pass --overwrite to start over")
            shutil.rmtree(out)
        elif any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
            shutil.rmtree(out)
    parts.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(parts / SETTINGS_FILE, identity)


def _agree(rank: int, world: int, make: Callable[[], Any]) -> Any:
    """Rank 0 computes `make()` (a value or an exception) and every rank gets it; errors raise everywhere."""
    result: Any
    if rank == 0:
        try:
            result = ("ok", make())
        except (ValueError, FileExistsError, OSError) as e:
            result = (type(e).__name__, str(e))
    if world > 1:
        box = [result if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    kind, value = result
    if kind == "FileExistsError":
        raise FileExistsError(value)
    if kind != "ok":
        raise ValueError(value)
    return value


def _read_part(path: Path) -> Iterator[dict[str, Any]]:
    from streaming import LocalDataset  # deferred: importing streaming pulls in torchvision

    if split_num_samples(path) == 0:
        return  # a chunk where nothing was kept (LocalDataset cannot open a split without shards)
    ds = LocalDataset(str(path))
    for i in range(len(ds)):
        yield dict(ds[i])


def run_capfilt(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: str | Path, out: str | Path,
                settings: CapFiltSettings, *, identity: Optional[dict[str, Any]] = None, rank: int = 0,
                world: int = 1, overwrite: bool = False, max_chunks: int = 0,
                progress: Optional[Callable[[int, int], None]] = None,
                captioner: Optional[Captioner] = None) -> Optional[dict[str, Any]]:
    """Run CapFilt on this rank's share of `data` into `out`; all ranks call it together.

    `model` filters, and captions too unless a separate `captioner` is given (its run joins `identity`).
    identity: what must match for a restart to resume (settings, checkpoint(s), input), default the settings.
    max_chunks > 0 stops each rank after that many chunks without merging (time-boxed jobs; run again to
    continue). progress(n, total) is called after each chunk with its images and this rank's total.
    Returns the report on rank 0 once the output is complete, else None.
    """
    from streaming import LocalDataset

    data, out = Path(data), Path(out)
    num_samples = verify_split(data)
    # min_keep only judges the merged result: a run refused for it can be merged again with another value.
    kept_settings = {k: v for k, v in settings.as_dict().items() if k != "min_keep"}
    identity = dict(identity or {}, settings=kept_settings, num_samples=num_samples)
    if captioner is not None:  # absent for one model, so runs started before --captioner existed still resume
        identity["captioner"] = captioner.identity()
    total = num_chunks(num_samples, settings.chunk_size)

    def plan() -> list[int]:
        prepare_output(out, identity, overwrite)
        return [k for k in range(total) if not marker_file(out, k).is_file()]

    missing = _agree(rank, world, plan)
    mine = missing[rank::world]
    if max_chunks > 0:
        mine = mine[:max_chunks]

    model.eval()
    device = next(model.parameters()).device
    ds = LocalDataset(str(data)) if mine else None  # (cannot open an empty split)

    def chunk_indices(k: int) -> range:
        return range(k * settings.chunk_size, min((k + 1) * settings.chunk_size, num_samples))

    my_images = sum(len(chunk_indices(k)) for k in mine)
    if progress is not None:
        progress(0, my_images)
    for k in mine:
        indices = chunk_indices(k)
        samples = [(i, dict(ds[i])) for i in indices]
        generator = torch.Generator(device=device).manual_seed(chunk_seed(settings.seed, k))
        rows, stats = process_chunk(model, tokenizer, samples, settings, generator, captioner)
        write_split(part_dir(out, k), rows, overwrite=True, extra_columns=EXTRA_COLUMNS)
        _write_json_atomic(marker_file(out, k), stats.to_json())  # after the part: marks it complete
        if progress is not None:
            progress(len(indices), my_images)

    if world > 1:
        dist.barrier()  # every part is on disk before rank 0 looks for them
    if rank != 0:
        return None
    done = [k for k in range(total) if marker_file(out, k).is_file()]
    if len(done) < total:
        return None  # stopped early by max_chunks: a later run continues
    return merge_parts(out, total, identity, settings.min_keep)


def merge_parts(out: Path, total: int, identity: dict[str, Any], min_keep: float = 0.0) -> dict[str, Any]:
    """Concatenate the chunk parts in order into the final split at `out`; write and return the report.

    When fewer than `min_keep` of the decodable input images kept a caption, nothing is written (the
    chunk results stay in OUT/.parts) and ValueError says so: such an output is a threshold mistake.
    """
    stats = CapFiltStats()
    for k in range(total):
        stats.merge_(CapFiltStats.from_json(json.loads(marker_file(out, k).read_text())))
    c = stats.counts
    decodable = c["images"] - c["undecodable"]
    if decodable and c["rows"] < min_keep * decodable:
        rule = (identity.get("thresholds") or {}).get("description", "the thresholds")
        raise ValueError(f"capfilt: only {c['rows']} of {decodable} images kept a caption "
                         f"({c['rows'] / decodable:.1%} < --min-keep {min_keep:.0%}) with {rule}; nothing was written "
                         f"to {out} (lower the thresholds or choose another rule; chunk results stay in "
                         f"{out / PARTS_DIR})")

    def rows() -> Iterator[dict[str, Any]]:
        for k in range(total):
            yield from _read_part(part_dir(out, k))

    # write_split writes beside `out` and swaps it in, dropping `.parts` with the old directory.
    written = write_split(out, rows(), overwrite=True, extra_columns=EXTRA_COLUMNS)
    if written != stats.counts["rows"]:
        raise RuntimeError(f"{out}: merged {written} rows, the chunk markers count {stats.counts['rows']}")
    report = build_report(stats, identity)
    _write_json_atomic(out / REPORT_FILE, report)
    return report
