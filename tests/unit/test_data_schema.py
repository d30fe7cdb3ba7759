"""The MDS schema: writer atomicity, overwrite refusal, version and column checks."""
from __future__ import annotations

import json

import pytest

from blip_train.data.images import encode_jpeg
from blip_train.data.schema import (COLUMNS, SCHEMA_FILE, SchemaError, make_sample, split_num_samples,
                                    verify_split, write_split)
from PIL import Image


def _rows(n: int):
    img = encode_jpeg(Image.new("RGB", (16, 16), (200, 10, 10)))
    for i in range(n):
        yield {"image": img, "image_id": i, "caption": f"caption {i}", "captions": [f"caption {i}"]}


def test_write_and_verify(tmp_path):
    out = tmp_path / "split"
    assert write_split(out, _rows(7)) == 7
    assert verify_split(out) == 7 == split_num_samples(out)
    meta = json.loads((out / SCHEMA_FILE).read_text())
    assert meta["schema"] == "blip-train/mds" and meta["version"] == 1 and meta["columns"] == COLUMNS
    assert not list(tmp_path.glob("split.tmp-*"))


def test_refuses_overwrite_and_replaces_when_asked(tmp_path):
    out = tmp_path / "split"
    write_split(out, _rows(3))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_split(out, _rows(5))
    assert write_split(out, _rows(5), overwrite=True) == 5
    assert verify_split(out) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield from _rows(2)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_split(tmp_path / "split", broken())
    assert list(tmp_path.iterdir()) == []


def test_verify_refuses_missing_or_other_version(tmp_path):
    out = tmp_path / "split"
    write_split(out, _rows(2))
    sidecar = out / SCHEMA_FILE
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(meta, version=2)))
    with pytest.raises(SchemaError, match=r"split: .*version 2, expected blip-train/mds version 1"):
        verify_split(out)
    sidecar.unlink()
    with pytest.raises(SchemaError, match=f"missing {SCHEMA_FILE}"):
        verify_split(out)
    with pytest.raises(SchemaError, match="nothing: split directory does not exist"):
        verify_split(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SchemaError, match="empty: no index.json"):
        verify_split(tmp_path / "empty")


def test_verify_refuses_missing_columns(tmp_path):
    from streaming import MDSWriter

    out = tmp_path / "old"
    with MDSWriter(out=str(out), columns={"image": "bytes", "caption": "str"}) as w:
        w.write({"image": b"x", "caption": "a"})
    (out / SCHEMA_FILE).write_text(json.dumps({"schema": "blip-train/mds", "version": 1}))
    with pytest.raises(SchemaError, match=r"old: shard columns do not match .*missing \['image_id'"):
        verify_split(out)


def test_make_sample_checks_types():
    row = make_sample(b"jpg", caption="a")
    assert row["question_id"] == -1 and row["answers"] == [] and row["noisy"] == 0
    with pytest.raises(SchemaError, match="unknown sample fields"):
        make_sample(b"jpg", text="a")
    with pytest.raises(SchemaError, match="'caption' must be str"):
        make_sample(b"jpg", caption=None)
    with pytest.raises(SchemaError, match="image"):
        make_sample(b"")
