"""3D data: point clouds read from .npy / .npz / .ply (ASCII and binary), centred and scaled into the unit sphere,
sampled by farthest point sampling, and the Cap3D-style converter (tools/convert_point_clouds.py) on files the test
writes: missing, empty, corrupt, non-finite, degenerate and too-small clouds skipped and counted."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blip_train.data.points import (PointCloudError, decode_points, farthest_point_sample, load_point_columns,
                                    normalize_points, read_point_file)
from tests.conftest import REPO, clean_env

TOOL = REPO / "tools" / "convert_point_clouds.py"


def sphere(n: int, seed: int = 0, centre=(3.0, -2.0, 5.0), radius: float = 4.0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return np.asarray(centre) + radius * v / np.linalg.norm(v, axis=1, keepdims=True)


def write_ply(path, points: np.ndarray, binary: bool, colours: np.ndarray | None = None) -> None:
    props = ["property float x", "property float y", "property float z"]
    if colours is not None:
        props += ["property uchar red", "property uchar green", "property uchar blue"]
    head = "\n".join(["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
                      f"element vertex {len(points)}", *props, "element face 0",
                      "property list uchar int vertex_indices", "end_header"]) + "\n"
    if binary:
        fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + (
            [("red", "u1"), ("green", "u1"), ("blue", "u1")] if colours is not None else [])
        rec = np.zeros(len(points), dtype=fields)
        rec["x"], rec["y"], rec["z"] = points.T
        if colours is not None:
            rec["red"], rec["green"], rec["blue"] = colours.T
        path.write_bytes(head.encode() + rec.tobytes())
    else:
        rows = [" ".join(f"{v:.6f}" for v in p) + ("" if colours is None else " " + " ".join(str(int(c)) for c in col))
                for p, col in zip(points, colours if colours is not None else [None] * len(points))]
        path.write_text(head + "\n".join(rows) + "\n")


def test_every_format_reads_the_same_cloud(tmp_path):
    pts = sphere(50).astype(np.float32)
    colours = np.random.default_rng(1).integers(0, 256, size=(50, 3)).astype(np.uint8)
    np.save(tmp_path / "a.npy", pts)
    np.savez(tmp_path / "b.npz", points=np.concatenate([pts, colours / 255.0], axis=1))
    write_ply(tmp_path / "c.ply", pts, binary=False)
    write_ply(tmp_path / "d.ply", pts, binary=True, colours=colours)
    for name in ("a.npy", "b.npz", "c.ply", "d.ply"):
        got = read_point_file(tmp_path / name)
        assert np.allclose(got[:, :3], pts, atol=1e-5), name
    assert np.allclose(read_point_file(tmp_path / "d.ply")[:, 3:], colours / 255.0)
    assert np.allclose(read_point_file(tmp_path / "b.npz")[:, 3:], colours / 255.0)
    (tmp_path / "e.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "f.npy", np.zeros((4, 4)))
    (tmp_path / "g.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 9\nproperty float x\n"
                                     b"property float y\nproperty float z\nend_header\n" + b"\0" * 20)
    for name, match in (("e.npy", "ValueError|UnpicklingError"), ("f.npy", r"shape \(4, 4\)"),
                        ("g.ply", "declares 9 vertices")):
        with pytest.raises(PointCloudError, match=match):
            read_point_file(tmp_path / name)


def test_normalised_into_the_unit_sphere_and_sampled_to_cover_the_shape():
    pts = normalize_points(sphere(2000, centre=(10.0, 10.0, 10.0), radius=7.0))
    assert np.allclose(pts.mean(axis=0), 0, atol=1e-9) and np.isclose(np.linalg.norm(pts, axis=1).max(), 1.0)
    # A dense blob plus a few far points: FPS keeps the far ones, where a random subset would almost surely not.
    blob = np.random.default_rng(0).normal(scale=0.01, size=(5000, 3))
    far = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])
    idx = farthest_point_sample(np.concatenate([blob, far]), 16)
    assert set(range(5000, 5004)) <= set(idx.tolist()) and len(set(idx.tolist())) == 16


def test_stored_columns_and_skip_reasons(tmp_path):
    np.save(tmp_path / "ok.npy", sphere(300))
    columns, reason = load_point_columns(tmp_path / "ok.npy", num_points=64)
    assert reason == "ok" and columns["point_channels"] == 3
    stored = decode_points(columns)
    assert stored.shape == (64, 3) and stored.dtype == np.float32
    assert np.linalg.norm(stored, axis=1).max() <= 1.0 + 1e-6
    assert Image.open(io.BytesIO(columns["image"])).size == (128, 128)
    np.save(tmp_path / "few.npy", sphere(10))
    np.save(tmp_path / "nan.npy", np.full((100, 3), np.nan))
    np.save(tmp_path / "flat.npy", np.ones((100, 3)))
    np.save(tmp_path / "zero.npy", np.zeros((0, 3)))
    (tmp_path / "empty.ply").write_bytes(b"")
    (tmp_path / "bad.ply").write_bytes(b"not a ply")
    for name, expected in (("few.npy", "too_few_points"), ("nan.npy", "nonfinite_points"),
                           ("flat.npy", "degenerate_points"), ("zero.npy", "empty_points"),
                           ("empty.ply", "empty_points"), ("bad.ply", "corrupt_points"),
                           ("absent.npy", "missing_points")):
        assert load_point_columns(tmp_path / name, num_points=64) == (None, expected), name


def test_converter_writes_a_point_split_and_counts_what_it_skips(tmp_path):
    from streaming import StreamingDataset

    src = tmp_path / "pcs"
    (src / "sub").mkdir(parents=True)
    np.save(src / "chair.npy", sphere(200, seed=1))
    write_ply(src / "sub" / "lamp.ply", sphere(200, seed=2), binary=True,
              colours=np.full((200, 3), 200, dtype=np.uint8))
    np.save(src / "tiny.npy", sphere(5))
    (src / "broken.npz").write_bytes(b"PK nonsense")
    (tmp_path / "caps.csv").write_text("chair,a wooden chair, with four legs\nlamp,a white lamp\ntiny,a speck\n"
                                       "broken,a broken file\nghost,a cloud that is not there\nempty,\n")
    out = tmp_path / "mds"
    r = subprocess.run([sys.executable, str(TOOL), "--points", str(src), "--captions", str(tmp_path / "caps.csv"),
                        "--num-points", "64", "--out", str(out), "--workers", "1"],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["written"] == 2
    assert summary["skipped"] == {"too_few_points": 1, "corrupt_points": 1, "missing_points": 1, "empty_text": 1}
    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    assert [r["caption"] for r in rows] == ["a wooden chair, with four legs", "a white lamp"]
    assert [decode_points(r).shape for r in rows] == [(64, 3), (64, 6)]
    assert np.allclose(decode_points(rows[1])[:, 3:], 200 / 255.0)
    bad = subprocess.run([sys.executable, str(TOOL), "--points", str(tmp_path / "nowhere"), "--captions",
                          str(tmp_path / "caps.csv"), "--out", str(tmp_path / "x")],
                         cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "point cloud directory does not exist" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
