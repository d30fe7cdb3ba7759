"""Image transforms: shapes, CLIP normalisation, determinism under a generator."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from blip_train.data.transforms import (CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, build_transform,
                                        random_resized_crop_box)


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def test_eval_resizes_and_normalises():
    im = Image.new("RGB", (50, 30), (255, 0, 128))
    x = EvalTransform(32)(im)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 16, 16], expected, atol=1e-5)


def test_train_is_deterministic_under_a_generator_and_random_without():
    t = TrainTransform(32, crop_scale_min=0.5, hflip=True)
    a = t(_image(), generator=torch.Generator().manual_seed(3))
    b = t(_image(), generator=torch.Generator().manual_seed(3))
    c = t(_image(), generator=torch.Generator().manual_seed(4))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_crop_box_respects_scale_and_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(64, 48, (0.5, 1.0), generator=g)
        assert 0 <= left and left + w <= 64 and 0 <= top and top + h <= 48
        assert 0.5 * 64 * 48 * 0.9 <= w * h <= 64 * 48  # rounding slack
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), generator=g)[2:] == (13, 10)  # fallback: centred


def test_flip_only_when_enabled():
    im = Image.new("RGB", (32, 32))
    im.paste((255, 255, 255), (0, 0, 16, 32))  # left half white
    no_flip = TrainTransform(32, crop_scale_min=1.0, hflip=False)
    for seed in range(8):
        x = no_flip(im, generator=torch.Generator().manual_seed(seed))
        assert x[0, :, :8].mean() > x[0, :, 24:].mean()
    flip = TrainTransform(32, crop_scale_min=1.0, hflip=True)
    flipped = [bool(flip(im, generator=torch.Generator().manual_seed(s))[0, :, :8].mean() < 0) for s in range(16)]
    assert any(flipped) and not all(flipped)
    assert isinstance(build_transform(32, train=False), EvalTransform)
