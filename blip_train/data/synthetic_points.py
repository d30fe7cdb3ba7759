"""A synthetic 3D question-answering dataset: coloured solids whose shape, colour and proportions are asked about.

Each cloud is one solid's surface, sampled with points in its colour (xyz + rgb, as ULIP-2's Point-BERT reads):
    shape       sphere | cube | cone | torus
    colour      red | green | blue (jittered)
    proportion  tall (stretched along y) | wide (stretched along x and z)
turned by a random angle about the vertical axis, then normalised and farthest-point sampled as the converter
does (data/points.py), so size says nothing: proportions survive normalisation, size would not. Each cloud gives
three rows, one per question ("what shape is this?", "what color is it?", "is it tall or wide?"), answered with
one word; 24 kinds of cloud, so a model that ignores the cloud scores what the most common answer of each
question earns. Rows are point rows of the schema (a front view as `image`); generation is a pure function of
(seed, index).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from blip_train.data.points import POINTS_COLUMNS, farthest_point_sample, normalize_points, point_columns
from blip_train.data.schema import write_split
from blip_train.data.synthetic import split_sizes

SHAPES = ("sphere", "cube", "cone", "torus")
COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.25, 0.9)}
PROPORTIONS = ("tall", "wide")
QUESTIONS = {"shape": "what shape is this?", "colour": "what color is it?", "proportion": "is it tall or wide?"}
DATASET_NAME = "synthetic_solids"


def surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) points on the surface of a unit-sized solid centred at the origin."""
    if shape == "sphere":
        v = rng.standard_normal((n, 3))
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    if shape == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        face = rng.integers(0, 3, n)
        p[np.arange(n), face] = rng.choice([-1.0, 1.0], n)
        return p
    if shape == "cone":  # apex up; the base disk takes its share of the surface
        side = rng.random(n) < 0.7
        h = np.sqrt(rng.random(n))  # uniform over the lateral surface: radius grows linearly downwards
        angle = rng.uniform(0, 2 * np.pi, n)
        r = np.where(side, h, np.sqrt(rng.random(n)))
        y = np.where(side, 1 - 2 * h, -1.0)
        return np.stack([r * np.cos(angle), y, r * np.sin(angle)], axis=1)
    if shape == "torus":  # lying flat, the ring around the vertical axis
        u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
        big, small = 0.7, 0.3
        return np.stack([(big + small * np.cos(v)) * np.cos(u), small * np.sin(v),
                         (big + small * np.cos(v)) * np.sin(u)], axis=1)
    raise ValueError(f"unknown shape {shape!r}")


def make_solid(shape: str, colour: str, proportion: str, num_points: int, rng: random.Random) -> np.ndarray:
    """(num_points, 6) normalised, farthest-point-sampled cloud: xyz + rgb in [0, 1]."""
    g = np.random.default_rng(rng.getrandbits(32))
    xyz = surface(shape, num_points * 2, g)
    stretch = np.array([1.0, 1.9, 1.0]) if proportion == "tall" else np.array([1.7, 1.0, 1.7])
    xyz = xyz * stretch * g.uniform(0.9, 1.1, 3)
    turn = g.uniform(0, 2 * np.pi)
    c, s = np.cos(turn), np.sin(turn)
    xyz = xyz @ np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    rgb = np.clip(np.array(COLOURS[colour]) + g.normal(0, 0.06, (len(xyz), 3)), 0, 1)
    cloud = normalize_points(np.concatenate([xyz, rgb], axis=1))
    return cloud[farthest_point_sample(cloud[:, :3], num_points)]


def make_rows(index: int, seed: int, num_points: int = 512) -> list[dict[str, Any]]:
    """One cloud's three question rows (schema point rows sharing the cloud's columns and image_id)."""
    rng = random.Random(f"solids-{seed}-{index}")
    shape, colour, proportion = rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(PROPORTIONS)
    columns = point_columns(make_solid(shape, colour, proportion, num_points, rng))
    caption = f"a {colour} {proportion} {shape}"
    answers = {"shape": shape, "colour": colour, "proportion": proportion}
    return [{**columns, "image_id": index, "caption": caption, "captions": [caption], "task": "vqa",
             "question": QUESTIONS[q], "answer": answers[q], "answers": [answers[q]] * 10, "dataset": DATASET_NAME,
             "source": "synthetic"} for q in QUESTIONS]


def write_synthetic_points_dataset(out: str | Path, num_clouds: int, seed: int = 0, num_points: int = 512,
                                   val_fraction: float = 0.2, overwrite: bool = False,
                                   on_write: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Write `out/train` and `out/val` (point splits, three question rows per cloud); return the row counts."""
    n_train, n_val = split_sizes(num_clouds, val_fraction)

    def rows(first: int, n: int) -> Iterator[dict[str, Any]]:
        return (row for i in range(first, first + n) for row in make_rows(i, seed, num_points))

    out = Path(out)
    return {"out": str(out), "num_points": num_points, "seed": seed,
            "train": write_split(out / "train", rows(0, n_train), overwrite=overwrite, on_write=on_write,
                                 extra_columns=POINTS_COLUMNS),
            "val": write_split(out / "val", rows(n_train, n_val), overwrite=overwrite, on_write=on_write,
                               extra_columns=POINTS_COLUMNS)}
