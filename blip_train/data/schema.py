"""The one MDS schema every split uses (captions, VQA, instructions), its version, and a safe writer.

Every split directory holds MosaicML streaming shards plus a sidecar `blip_train_schema.json`:

    {"schema": "blip-train/mds", "version": 1, "columns": {<name>: <MDS encoding>, ...}}

Columns (version 1):

| column      | encoding | meaning                                                               |
|-------------|----------|-----------------------------------------------------------------------|
| image       | bytes    | encoded JPEG or PNG, always RGB (converters normalise everything else)  |
| image_id    | int      | id of the image (several samples may share one image)                   |
| caption     | str      | the training caption; "" for pure VQA / instruction data               |
| captions    | json     | list of all reference captions of the image (evaluation, CapFilt)      |
| question    | str      | question or instruction; "" for caption data                          |
| answer      | str      | the training answer                                                   |
| answers     | json     | list of all human answers (10 for VQAv2), for VQA accuracy             |
| task        | str      | caption | vqa | conversation | ...                                       |
| dataset     | str      | dataset name (coco, vqav2, synthetic_shapes, ...)                      |
| question_id | int      | question id, -1 if none                                               |
| noisy       | int      | 1 when the caption is known to be wrong (synthetic noise), else 0       |
| source      | str      | web | synthetic | <dataset> | <dataset>/<domain> (NoCaps: nocaps/in-domain...) |

Readers call `verify_split` and refuse a split whose sidecar version or shard columns differ, so a
stale conversion fails at start-up with one line instead of a KeyError deep inside a worker.

Extra columns: a producer may add columns of its own beside these (`write_split(extra_columns=...)`,
listed under "extra_columns" in the sidecar; e.g. CapFilt's `orig_index`, `itm_score`, `itc_score`).
Readers ignore them, and `verify_split` accepts them as long as every schema column is present.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

SCHEMA_NAME = "blip-train/mds"
SCHEMA_VERSION = 1
SCHEMA_FILE = "blip_train_schema.json"

COLUMNS: dict[str, str] = {
    "image": "bytes",
    "image_id": "int",
    "caption": "str",
    "captions": "json",
    "question": "str",
    "answer": "str",
    "answers": "json",
    "task": "str",
    "dataset": "str",
    "question_id": "int",
    "noisy": "int",
    "source": "str",
}

# Values used when a converter has nothing for a column.
DEFAULTS: dict[str, Any] = {
    "image_id": 0, "caption": "", "captions": [], "question": "", "answer": "", "answers": [],
    "task": "caption", "dataset": "", "question_id": -1, "noisy": 0, "source": "",
}

TASKS = ("caption", "vqa", "conversation")

DRAW_CAPTION_SOURCE = "capfilt"
"""A row whose `source` is this holds several training captions of one image in `captions` (CapFilt's
kept web and synthetic captions); readers draw one per visit (`draw_caption`), `caption` is the first."""


def draw_caption(row: dict[str, Any], seed: int) -> dict[str, Any]:
    """The row with its training caption drawn from `captions` when it is a DRAW_CAPTION_SOURCE row (a pure
    function of the sample's seed, so a resumed run draws what the uninterrupted one drew); else unchanged."""
    captions = row.get("captions") or []
    if row.get("source") != DRAW_CAPTION_SOURCE or len(captions) < 2:
        return row
    import random

    caption = captions[random.Random(f"caption-{seed}").randrange(len(captions))]
    out = dict(row, caption=caption)
    if row.get("task") == "caption" and row.get("answer") == row.get("caption"):
        out["answer"] = caption
    return out


class SchemaError(ValueError):
    """A split that does not follow the schema this code reads."""


def make_sample(image: bytes, **fields: Any) -> dict[str, Any]:
    """A complete schema row: missing columns take their defaults, types are checked here (not in a worker)."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise SchemaError(f"unknown sample fields {sorted(unknown)}; schema columns are {list(COLUMNS)}")
    row = {**DEFAULTS, **fields, "image": image}
    if not isinstance(row["image"], (bytes, bytearray)) or not row["image"]:
        raise SchemaError("sample field 'image' must be non-empty encoded image bytes")
    for key in ("image_id", "question_id", "noisy"):
        row[key] = int(row[key])
    for key in ("caption", "question", "answer", "task", "dataset", "source"):
        if not isinstance(row[key], str):
            raise SchemaError(f"sample field {key!r} must be str, got {type(row[key]).__name__}")
    for key in ("captions", "answers"):
        row[key] = [str(x) for x in row[key]]
    return row


def _index_columns(split_dir: Path) -> list[tuple[list[str], list[str]]]:
    index = split_dir / "index.json"
    if not index.is_file():
        raise SchemaError(f"{split_dir}: no index.json (not an MDS split; convert it with tools/convert_*.py)")
    try:
        shards = json.loads(index.read_text())["shards"]
    except (ValueError, KeyError) as e:
        raise SchemaError(f"{split_dir}: unreadable index.json ({e})") from None
    return [(s.get("column_names", []), s.get("column_encodings", [])) for s in shards]


def verify_split(split_dir: str | os.PathLike) -> int:
    """Check a split's sidecar version and its shards' columns; return its number of samples.

    Raises SchemaError with one line naming the directory and what was expected.
    """
    split = Path(split_dir)
    sidecar = split / SCHEMA_FILE
    expected = f"{SCHEMA_NAME} version {SCHEMA_VERSION}"
    if not split.is_dir():
        raise SchemaError(f"{split}: split directory does not exist; expected an MDS split with schema {expected}")
    shard_columns = _index_columns(split)
    if not sidecar.is_file():
        raise SchemaError(f"{split}: missing {SCHEMA_FILE}; expected a split written with schema {expected} "
                          "(re-run the converter)")
    try:
        meta = json.loads(sidecar.read_text())
    except ValueError:
        raise SchemaError(f"{split}: {SCHEMA_FILE} is not valid JSON; expected schema {expected}") from None
    if meta.get("schema") != SCHEMA_NAME or meta.get("version") != SCHEMA_VERSION:
        raise SchemaError(f"{split}: schema {meta.get('schema')!r} version {meta.get('version')!r}, "
                          f"expected {expected} (re-run the converter)")
    for names, encodings in shard_columns:
        have = dict(zip(names, encodings))
        missing = [c for c in COLUMNS if c not in have]
        wrong = [f"{c}={have[c]} (expected {e})" for c, e in COLUMNS.items() if c in have and have[c] != e]
        if missing or wrong:
            raise SchemaError(f"{split}: shard columns do not match schema {expected}: missing {missing}, "
                              f"wrong encodings {wrong}")
    return split_num_samples(split)


def split_num_samples(split_dir: str | os.PathLike) -> int:
    """Number of samples in a split according to its index.json (no sidecar check)."""
    index = json.loads((Path(split_dir) / "index.json").read_text())
    return sum(int(s["samples"]) for s in index["shards"])


def write_split(out_dir: str | os.PathLike, samples: Iterable[Mapping[str, Any]], *, overwrite: bool = False,
                compression: Optional[str] = None, size_limit: int | str = 1 << 26,
                on_write: Optional[Callable[[], None]] = None,
                extra_columns: Optional[Mapping[str, str]] = None) -> int:
    """Write schema rows as an MDS split at `out_dir`; return the number written.

    `extra_columns` ({name: MDS encoding}) adds producer-specific columns beyond COLUMNS; every row
    must then carry those keys (their values go to MDS unchecked).

    Rows go to `<out_dir>.tmp-<pid>` first and are renamed into place only when complete, so a
    crashed or interrupted conversion never leaves a half split that a reader would accept.
    An existing `out_dir` is refused unless `overwrite` is True.
    """
    from streaming import MDSWriter  # deferred: importing streaming pulls in torchvision

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    extra = dict(extra_columns or {})
    clash = sorted(set(extra) & set(COLUMNS))
    if clash:
        raise SchemaError(f"extra columns {clash} redefine schema columns")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with MDSWriter(out=str(tmp), columns={**COLUMNS, **extra}, compression=compression, size_limit=size_limit,
                       progress_bar=False) as writer:
            for row in samples:
                if extra:
                    missing = [k for k in extra if k not in row]
                    if missing:
                        raise SchemaError(f"sample lacks extra columns {missing}")
                    sample = make_sample(**{k: v for k, v in row.items() if k not in extra})
                    sample.update({k: row[k] for k in extra})
                else:
                    sample = make_sample(**row)
                writer.write(sample)
                count += 1
                if on_write is not None:
                    on_write()
        meta = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "columns": COLUMNS, "num_samples": count}
        if extra:
            meta["extra_columns"] = extra
        (tmp / SCHEMA_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            # Move the old split aside first: the rename into place stays a single step.
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count
