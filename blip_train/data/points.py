"""3D samples in the MDS schema: a point cloud, normalised and sampled to a fixed number of points at conversion.

A point-cloud split is a split of the one schema (data/schema.py) with extra columns (POINTS_COLUMNS):
    image           a picture of the cloud (front view, points shaded by depth or drawn in their colours), so
                    image readers, inspection tools and TensorBoard examples work unchanged
    points          float32 (num_points, channels), little-endian: xyz, then rgb in [0, 1] when the source had
                    colours (Cap3D's Objaverse clouds do; ULIP-2's Point-BERT reads xyz + rgb)
    point_channels  3 (xyz) or 6 (xyz + rgb)
Conversion does what ULIP-2 / X-InstructBLIP do before the encoder: centre the cloud on its centroid, scale it
into the unit sphere, and take a fixed number of points (8,192 in both) by farthest point sampling, which keeps
the shape's extent where a random subset thins out small parts. Done once at conversion, not per step: FPS over
a 100k-point cloud costs tens of milliseconds.

Readers: `.npy` (N, 3 | 6), `.npz` (its `points` array, else its only one) and `.ply` (ASCII or binary
little-endian; vertex x, y, z and, when present, red, green, blue as 0-255 integers or 0-1 floats).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

POINTS_COLUMNS: dict[str, str] = {"points": "bytes", "point_channels": "int32"}
"""Extra MDS columns of a point-cloud split (write_split(extra_columns=...))."""

NUM_POINTS = 8192
"""Points per cloud in ULIP-2's and X-InstructBLIP's Point-BERT."""

MISSING_POINTS = "missing_points"
EMPTY_POINTS = "empty_points"
CORRUPT_POINTS = "corrupt_points"
NONFINITE_POINTS = "nonfinite_points"
TOO_FEW_POINTS = "too_few_points"
DEGENERATE_POINTS = "degenerate_points"

POINT_EXTS = (".npy", ".npz", ".ply")

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


class PointCloudError(ValueError):
    """A file that is not a readable point cloud (the converter counts it as corrupt_points)."""


def _read_ply(data: bytes) -> np.ndarray:
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise PointCloudError("not a PLY file (no 'ply' magic or end_header)")
    header = data[:end].decode("ascii", "replace").splitlines()
    body = data[data.index(b"\n", end) + 1:]
    fmt = next((line.split()[1] for line in header if line.startswith("format ")), "")
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for line in header:
        parts = line.split()
        if parts[:1] == ["element"]:
            elements.append((parts[1], int(parts[2]), []))
        elif parts[:1] == ["property"] and elements:
            if parts[1] == "list":
                if elements[-1][0] == "vertex":
                    raise PointCloudError("PLY vertex element has a list property")
                elements[-1][2].append((parts[-1], "list"))
            else:
                elements[-1][2].append((parts[-1], _PLY_TYPES.get(parts[1], "")))
    vertex = next((e for e in elements if e[0] == "vertex"), None)
    if vertex is None or elements[0] is not vertex:
        raise PointCloudError("PLY without a leading vertex element")
    _, count, props = vertex
    if any(not t for _, t in props):
        raise PointCloudError("PLY vertex property of an unknown type")
    names = [n for n, _ in props]
    if fmt == "ascii":
        rows = body.decode("ascii", "replace").split("\n")[:count]
        table = np.array([[float(v) for v in r.split()[:len(names)]] for r in rows if r.strip()], dtype=np.float64)
        if table.shape != (count, len(names)):
            raise PointCloudError(f"PLY declares {count} vertices, holds {table.shape[0]}")
        values = {n: table[:, i] for i, n in enumerate(names)}
    elif fmt == "binary_little_endian":
        dtype = np.dtype([(n, "<" + t) for n, t in props])
        if len(body) < dtype.itemsize * count:
            raise PointCloudError(f"PLY declares {count} vertices, the file ends before them")
        rec = np.frombuffer(body, dtype=dtype, count=count)
        values = {n: rec[n].astype(np.float64) for n in names}
    else:
        raise PointCloudError(f"PLY format {fmt!r} (ascii and binary_little_endian are read)")
    if not {"x", "y", "z"} <= set(values):
        raise PointCloudError("PLY vertices without x, y, z")
    cols = [values["x"], values["y"], values["z"]]
    if {"red", "green", "blue"} <= set(values):
        rgb = np.stack([values["red"], values["green"], values["blue"]], axis=1)
        scale = 255.0 if dict(props)["red"].startswith(("u", "i")) else 1.0
        cols += list((rgb / scale).T)
    return np.stack(cols, axis=1)


def read_point_file(path: Union[str, os.PathLike]) -> np.ndarray:
    """(N, 3 | 6) float64 from a .npy / .npz / .ply file; PointCloudError when it is not one."""
    path = Path(path)
    data = path.read_bytes()
    try:
        if path.suffix.lower() == ".ply":
            arr = _read_ply(data)
        elif path.suffix.lower() == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                key = "points" if "points" in z.files else (z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise PointCloudError(f"npz with arrays {z.files}: expected 'points' or a single array")
                arr = z[key]
        else:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
    except PointCloudError:
        raise
    except Exception as e:  # numpy's and zipfile's errors for bytes that are not what the suffix says
        raise PointCloudError(f"{type(e).__name__}: {e}") from None
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6) or not np.issubdtype(arr.dtype, np.number):
        raise PointCloudError(f"array of shape {arr.shape} and dtype {arr.dtype}: expected (N, 3) xyz or (N, 6) "
                              "xyz + rgb")
    return arr.astype(np.float64)


def normalize_points(points: np.ndarray) -> np.ndarray:
    """xyz centred on the centroid and scaled into the unit sphere (the farthest point at radius 1); colours
    (columns 3-5) scaled to [0, 1] when given as 0-255."""
    out = points.astype(np.float64).copy()
    xyz = out[:, :3] - out[:, :3].mean(axis=0)
    out[:, :3] = xyz / np.linalg.norm(xyz, axis=1).max()
    if out.shape[1] == 6 and out[:, 3:].max() > 1.0:
        out[:, 3:] /= 255.0
    return out


def farthest_point_sample(xyz: np.ndarray, n: int) -> np.ndarray:
    """Indices of `n` points chosen greedily, each the farthest from those already chosen (starting from the
    first point: deterministic)."""
    chosen = np.zeros(n, dtype=np.int64)
    dist = np.full(xyz.shape[0], np.inf)
    last = 0
    for i in range(n):
        chosen[i] = last
        dist = np.minimum(dist, ((xyz - xyz[last]) ** 2).sum(axis=1))
        last = int(dist.argmax())
    return chosen


def point_picture(points: np.ndarray, size: int = 128) -> bytes:
    """A front view (x right, y up) of a normalised cloud as a JPEG: the nearest point of each pixel, in its
    colour, or shaded by depth (near white) when the cloud has none."""
    from PIL import Image

    from blip_train.data.images import encode_jpeg

    img = np.zeros((size, size, 3), dtype=np.uint8)
    px = np.clip(((points[:, 0] + 1) / 2 * (size - 1)).round().astype(int), 0, size - 1)
    py = np.clip(((1 - points[:, 1]) / 2 * (size - 1)).round().astype(int), 0, size - 1)
    depth = points[:, 2]
    order = np.argsort(-depth)  # far first, so nearer points overwrite them
    if points.shape[1] == 6:
        colour = np.clip(points[:, 3:6] * 255, 0, 255).astype(np.uint8)
    else:
        shade = np.clip((1 - depth) / 2 * 205 + 50, 0, 255).astype(np.uint8)
        colour = np.stack([shade] * 3, axis=1)
    img[py[order], px[order]] = colour[order]
    return encode_jpeg(Image.fromarray(img))


def point_columns(points: np.ndarray) -> dict[str, Any]:
    """The stored columns of a normalised, sampled cloud: {"image", "points", "point_channels"}."""
    stored = np.ascontiguousarray(points, dtype="<f4")
    return {"image": point_picture(stored), "points": stored.tobytes(), "point_channels": int(stored.shape[1])}


def decode_points(row: dict[str, Any]) -> np.ndarray:
    """(num_points, channels) float32 of a stored row."""
    channels = int(row["point_channels"])
    return np.frombuffer(row["points"], dtype="<f4").reshape(-1, channels)


def load_point_columns(path: Union[str, os.PathLike], num_points: int = NUM_POINTS
                       ) -> tuple[Optional[dict[str, Any]], str]:
    """({"image", "points", "point_channels"}, "ok") of a point-cloud file, normalised and sampled to
    `num_points` by farthest point sampling, or (None, reason)."""
    path = Path(path)
    if not path.is_file():
        return None, MISSING_POINTS
    if path.stat().st_size == 0:
        return None, EMPTY_POINTS
    try:
        points = read_point_file(path)
    except PointCloudError:
        return None, CORRUPT_POINTS
    if points.shape[0] == 0:
        return None, EMPTY_POINTS
    if not np.isfinite(points).all():
        return None, NONFINITE_POINTS
    if points.shape[0] < num_points:
        return None, TOO_FEW_POINTS
    if math.isclose(float(np.ptp(points[:, :3], axis=0).max()), 0.0):
        return None, DEGENERATE_POINTS  # every point in one place: no shape to normalise
    points = normalize_points(points)
    return point_columns(points[farthest_point_sample(points[:, :3], num_points)]), "ok"


def read_cap3d_captions(points_dir: str, csv_path: str, stats, *, dataset: str = "", num_points: int = NUM_POINTS):
    """PointsJobs of a Cap3D-style captions CSV: `uid,caption` lines (Cap3D ships them without a header; a
    header line `uid,caption` is accepted). The cloud is found under `points_dir` (recursively) by its stem, the
    uid. One row per uid (task caption); image_id numbers the clouds."""
    from blip_train.data.convert import InputError, PointsJob, clean_text, files_by_stem, read_csv_file, require_dir

    root = require_dir(points_dir, "point cloud")
    path = Path(csv_path)
    records = read_csv_file(path, dict_rows=False)
    if records and [c.strip().lower() for c in records[0][:2]] == ["uid", "caption"]:
        records = records[1:]
    if not records or any(len(r) < 2 for r in records[:1]):
        raise InputError(f"{path}: expected 'uid,caption' lines (Cap3D's format)")
    files = files_by_stem(root, POINT_EXTS)
    name = dataset or "cap3d"
    image_id = 0
    for rec in records:
        uid = rec[0].strip()
        caption, reason = clean_text(",".join(rec[1:]))  # an unquoted caption with commas stays whole
        if not uid:
            stats.skip("malformed_record")
            continue
        if caption is None:
            stats.skip(reason)
            continue
        row = {"caption": caption, "captions": [caption], "task": "caption", "dataset": name, "source": uid,
               "image_id": image_id}
        image_id += 1
        yield PointsJob(files.get(uid, str(root / f"{uid}.npy")), [row], num_points=num_points)


class TooFewPointsError(ValueError):
    """A stored cloud holds fewer points than the run reads (model.points.num_points): a split/config mismatch,
    not a corrupt sample."""


@dataclass(frozen=True)
class PointFeatures:
    """How a run reads a stored cloud (model.modality=3d): its first `num_points` points (a farthest point sample
    themselves, as clouds are stored in that order) as float32 (num_points, channels)."""
    num_points: int
    channels: int
    kind: str = "point cloud"
    """What it reads, in the loaders' log lines."""

    def __call__(self, row: dict[str, Any]) -> Any:
        """(num_points, channels) float32 tensor from a row's `points` column."""
        import torch

        if row.get("points") is None:
            raise ValueError(f"model.modality=3d, but a row of dataset {row.get('dataset', '?')!r} has no points "
                             "column: convert the split with tools/convert_point_clouds.py")
        points = decode_points(row)
        if points.shape[1] != self.channels:
            raise ValueError(f"a cloud of dataset {row.get('dataset', '?')!r} has {points.shape[1]} channels; the "
                             f"encoder (model.points.encoder) reads {self.channels} "
                             f"({'xyz + rgb' if self.channels == 6 else 'xyz'})")
        if points.shape[0] < self.num_points:
            raise TooFewPointsError(f"a cloud of dataset {row.get('dataset', '?')!r} holds {points.shape[0]} points; "
                                    f"model.points.num_points={self.num_points}: convert with --num-points "
                                    f"{self.num_points} or read fewer")
        return torch.from_numpy(points[:self.num_points].copy())


def model_point_features(model: Any) -> Optional[PointFeatures]:
    """The reader of a run's model (`model`: the config's ModelConfig) when model.modality=3d, else None."""
    if model.modality != "3d":
        return None
    from blip_train.models.point_encoder import read_point_bert_shape

    return PointFeatures(model.points.num_points, read_point_bert_shape(model.points.encoder).in_channels)
