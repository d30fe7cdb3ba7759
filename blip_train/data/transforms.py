"""Image transforms of BLIP-2: random resized crop + flip for training, plain resize for evaluation.

Written with PIL and torch so that every random draw can come from an explicit `torch.Generator`
(tests pin it); without one, the global torch RNG is used, which DataLoader seeds per worker.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from PIL import Image

# CLIP / EVA normalisation, as the BLIP-2 vision towers were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_normalized_tensor(im: Image.Image, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> torch.Tensor:
    """RGB PIL image → float tensor (3, H, W), scaled to [0, 1] then normalised per channel."""
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return x.sub_(m).div_(s)


def _uniform(lo: float, hi: float, generator: Optional[torch.Generator]) -> float:
    return lo + (hi - lo) * torch.rand(1, generator=generator).item()


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h) drawn as torchvision's RandomResizedCrop does (10 tries, then centre)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return left, top, w, h
    # Fallback: the largest centred crop whose aspect ratio lies inside `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """RandomResizedCrop(image_size, scale=(crop_scale_min, 1), bicubic) → optional h-flip → normalise."""

    def __init__(self, image_size: int, crop_scale_min: float = 0.5, hflip: bool = True,
                 mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> None:
        if not 0.0 < crop_scale_min <= 1.0:
            raise ValueError(f"data.crop_scale_min must be in (0, 1], got {crop_scale_min}")
        self.image_size = image_size
        self.scale = (crop_scale_min, 1.0)
        self.hflip = hflip
        self.mean, self.std = mean, std

    def __call__(self, im: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        left, top, w, h = random_resized_crop_box(im.width, im.height, self.scale, generator=generator)
        out = im.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC,
                        box=(left, top, left + w, top + h))
        if self.hflip and torch.rand(1, generator=generator).item() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(out, self.mean, self.std)


class EvalTransform:
    """Resize to (image_size, image_size) bicubic → normalise (no randomness)."""

    def __init__(self, image_size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> None:
        self.image_size = image_size
        self.mean, self.std = mean, std

    def __call__(self, im: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        out = im.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return to_normalized_tensor(out, self.mean, self.std)


def build_transform(image_size: int, train: bool, crop_scale_min: float = 0.5,
                    hflip: bool = True) -> TrainTransform | EvalTransform:
    """The training or evaluation transform for `image_size` pixels."""
    if train:
        return TrainTransform(image_size, crop_scale_min, hflip)
    return EvalTransform(image_size)
