"""The conversion pipeline shared by tools/convert_*.py: parse → normalise images in parallel → write.

A format reader (`formats.py`) yields `ImageJob`s: one image source plus the schema rows that use
it, so an image with five captions is decoded once. Text problems are counted by the reader; image
problems by `load_and_normalize_image` in worker processes. Every skipped sample is counted under
one reason, and the split appears at its final path only when complete (`schema.write_split`).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from tqdm import tqdm

from blip_train.data.images import RESIZE_SHORT_SIDE, load_and_normalize_image
from blip_train.data.schema import write_split

# Text-level skip reasons (image-level ones live in images.py).
EMPTY_TEXT = "empty_text"
BAD_TEXT_ENCODING = "bad_text_encoding"


class InputError(Exception):
    """The input cannot be used at all (missing/malformed file); tools print it as one line and exit 2."""


@dataclass
class ImageJob:
    """One image and the rows (schema fields without `image`) that share it."""
    source: Union[str, bytes]
    rows: list[dict[str, Any]]


@dataclass
class VideoJob(ImageJob):
    """One video file, `frames` of it sampled (data/video.py), and the rows that share it."""
    frames: int = 4


@dataclass
class AudioJob(ImageJob):
    """One audio file (or a video file's audio track), its first `max_seconds` (0: all), and the rows sharing it."""
    max_seconds: float = 0.0


@dataclass
class PointsJob(ImageJob):
    """One point-cloud file, normalised and sampled to `num_points` (data/points.py), and the rows sharing it."""
    num_points: int = 8192


@dataclass
class ConvertStats:
    out: str = ""
    written: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Skipped samples by reason (an unreadable image with five captions counts five)."""
    skipped_images: Counter = field(default_factory=Counter)
    """Skipped images by reason."""
    image_bytes_read: int = 0
    """Bytes of the source files of the images written."""
    image_bytes_stored: int = 0
    """Bytes of those images as stored (pre-resized, re-encoded where needed)."""

    def skip(self, reason: str, samples: int = 1) -> None:
        self.skipped[reason] += samples

    def as_dict(self) -> dict[str, Any]:
        return {"out": self.out, "written": self.written, "images": self.images,
                "skipped": dict(self.skipped), "skipped_images": dict(self.skipped_images),
                "image_bytes_read": self.image_bytes_read, "image_bytes_stored": self.image_bytes_stored,
                "image_bytes_saved": self.image_bytes_read - self.image_bytes_stored}


def clean_text(value: Any) -> tuple[Optional[str], str]:
    """(stripped UTF-8 text, "ok") or (None, reason) for empty, missing or non-UTF-8 text."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, BAD_TEXT_ENCODING
    if not isinstance(value, str):
        return None, EMPTY_TEXT
    try:
        # JSON can smuggle lone surrogates ("\ud800") that no UTF-8 writer accepts.
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, BAD_TEXT_ENCODING
    value = " ".join(value.split())
    return (value, "ok") if value else (None, EMPTY_TEXT)


def load_json(path: Union[str, os.PathLike]) -> Any:
    """Parse a JSON (or JSON-lines) file; raise InputError with one line naming the file otherwise."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a directory; expected a JSON file")
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        if p.suffix == ".jsonl":
            try:
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError:
                pass
        raise InputError(f"{p}: malformed JSON ({first.msg} at line {first.lineno} column {first.colno})") from None


def require_dir(path: Union[str, os.PathLike], what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: {what} directory does not exist")
    return p


def files_by_stem(root: Path, exts: tuple[str, ...]) -> dict[str, str]:
    """File stem → path of every file under `root` (recursively) ending in one of `exts`; the first in sorted
    order wins when a stem repeats. How the video, audio and point-cloud converters find an annotation's file."""
    files: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in sorted(names):
            if name.lower().endswith(exts):
                files.setdefault(Path(name).stem, os.path.join(dirpath, name))
    return files


def read_csv_file(path: Union[str, os.PathLike], dict_rows: bool) -> list:
    """The records of a UTF-8 CSV (dicts by its header, or lists of fields; blank lines dropped); InputError when
    it is missing or not UTF-8 CSV."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f)) if dict_rows else [r for r in csv.reader(f) if r]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a UTF-8 CSV ({e})") from None


@dataclass(frozen=True)
class ResizePolicy:
    """How converters downscale what they store (`images.resize_scale`); 0 disables a bound."""
    short_side: int = RESIZE_SHORT_SIDE
    max_side: int = 0


def _source_bytes(source: Union[str, bytes]) -> int:
    if isinstance(source, (bytes, bytearray)):
        return len(source)
    try:
        return os.path.getsize(source)
    except OSError:
        return 0


def _normalize_job(args: tuple[ImageJob, ResizePolicy]) -> tuple[Optional[dict[str, Any]], str, ImageJob, int]:
    """(the columns the job's rows get: `image`, and a video's or a clip's own columns; or None), reason, job,
    bytes read."""
    job, resize = args
    if isinstance(job, PointsJob):
        from blip_train.data.points import load_point_columns

        columns, reason = load_point_columns(job.source, job.num_points)
    elif isinstance(job, AudioJob):
        from blip_train.data.audio import load_audio_columns

        columns, reason = load_audio_columns(job.source, job.max_seconds)
    elif isinstance(job, VideoJob):
        from blip_train.data.video import load_video_frames

        columns, reason = load_video_frames(job.source, job.frames, resize.short_side, resize.max_side)
    else:
        data, reason = load_and_normalize_image(job.source, resize_short_side=resize.short_side,
                                                resize_max_side=resize.max_side)
        columns = None if data is None else {"image": data}
    return columns, reason, job, _source_bytes(job.source)


def _normalized(jobs: Iterable[ImageJob], workers: int, resize: ResizePolicy
                ) -> Iterator[tuple[Optional[dict[str, Any]], str, ImageJob, int]]:
    args = ((job, resize) for job in jobs)
    if workers <= 1:
        yield from map(_normalize_job, args)
        return
    # fork: workers inherit the imported modules; imap keeps input order, so output is deterministic.
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_normalize_job, args, chunksize=16)


def run_conversion(jobs: Iterable[ImageJob], out: Union[str, os.PathLike], stats: ConvertStats, *,
                   workers: int = 1, overwrite: bool = False, resize_short_side: int = RESIZE_SHORT_SIDE,
                   resize_max_side: int = 0, total: Optional[int] = None, desc: str = "images",
                   progress: bool = True, extra_columns: Optional[dict[str, str]] = None) -> ConvertStats:
    """Normalise every job's image (a VideoJob's sampled frames, an AudioJob's waveform, a PointsJob's cloud), write
    the surviving rows as one split; fill and return `stats`. `extra_columns`: the split's columns beyond the
    schema's (video: VIDEO_COLUMNS, audio: AUDIO_COLUMNS, 3D: POINTS_COLUMNS).

    Images are stored downscaled to a shorter side of `resize_short_side` (and a longer side of at most
    `resize_max_side`); 0 for both keeps every image at its size."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    stats.out = str(out)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)

    def rows() -> Iterator[dict[str, Any]]:
        for columns, reason, job, read in _normalized(jobs, workers, ResizePolicy(resize_short_side, resize_max_side)):
            bar.update(1)
            if columns is None:
                stats.skipped_images[reason] += 1
                stats.skip(reason, len(job.rows))
                continue
            stats.images += 1
            stats.image_bytes_read += read
            stats.image_bytes_stored += sum(len(v) for v in columns.values() if isinstance(v, bytes))
            for row in job.rows:
                yield {**row, **columns}

    try:
        stats.written = write_split(out, rows(), overwrite=overwrite, extra_columns=extra_columns)
    finally:
        bar.close()
    if stats.written == 0:
        shutil.rmtree(out, ignore_errors=True)
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())) or "input is empty"
        raise InputError(f"no usable samples, nothing written to {out} (skipped: {reasons})")
    return stats
