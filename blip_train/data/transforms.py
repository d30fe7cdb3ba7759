"""Image transforms of BLIP-2: random resized crop + flip for training, plain resize for evaluation.

Training images stay uint8 from decode to batch: `TrainTransform` returns a (3, S, S) uint8 tensor, the
collators stack them, and `normalize_pixels` turns the batch into CLIP-normalised floats once it is on
the training device (`blip_train.data.device.finish_batch`). That is four times fewer bytes through the
workers' shared memory and the host-to-device copy, and no per-sample float arithmetic in the workers.

The crop is decided before the image is decoded: its box needs only the image's size (read from the
header), and knowing it lets a JPEG decode straight to the smallest size that still covers the crop
with at least S x S pixels (DCT-domain downscaling by 1/2, 1/4 or 1/8, `images.decode_rgb_array`). The
random draws and their order are those of the full-size reference (torchvision's RandomResizedCrop, then
the flip), so the crop boxes and flips are exactly the same as decoding at full size. Only the resampling
differs: a DCT-domain reduction first when the crop allows one, and torch's uint8 antialiased bicubic,
which follows Pillow's filter within a grey level at a third of its time (`resize_box`), wherever the box
lies on whole decoded pixels: full-size decodes, and 1/2 decodes once their box is rounded to whole
pixels (`snap_box`: each edge moves by at most one stored pixel). Boxes at 1/4 and 1/8 keep their exact
fractional position and go through PIL. Against the full-size PIL reference on photographs: a mean
difference of a few hundredths of a grey level without reduction, 1-3 levels with one
(tests/unit/test_data_transforms.py; bench/data.py reports it per image set).

Every random draw can come from an explicit `torch.Generator` (the readers pass one seeded per
sample); without one, the global torch RNG is used, which DataLoader seeds per worker.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blip_train.data.images import EVAL_DCT_SCALES, decode_rgb_array, image_size

# CLIP / EVA normalisation, as the BLIP-2 vision towers were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[bytes, Image.Image]
"""Stored image bytes (what the readers pass: decoded here, DCT-scaled when that helps), or a PIL image."""


def normalize_pixels(pixels: torch.Tensor, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (..., 3, H, W) → `dtype`, scaled to [0, 1] then normalised per channel, on their device."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels expects uint8 images, got {pixels.dtype}")
    m = torch.tensor(mean, dtype=dtype, device=pixels.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=pixels.device).view(3, 1, 1)
    return pixels.to(dtype).div_(255.0).sub_(m).div_(s)


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image → uint8 tensor (3, H, W): a channels-last view of one copy of the pixels (stacking a
    batch makes it contiguous)."""
    arr = np.array(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy torch may own
    return torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)


def to_normalized_tensor(im: Image.Image, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> torch.Tensor:
    """RGB PIL image → float tensor (3, H, W), scaled to [0, 1] then normalised per channel."""
    return normalize_pixels(to_uint8_tensor(im), mean, std).contiguous()


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


def decode_covering(data: bytes, width: int, height: int, box: tuple[int, int, int, int],
                    size: int, fast_upsample: bool = False) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Decode `data` (a `width` x `height` image) no smaller than needed for `box` (left, top, w, h) to keep
    at least `size` x `size` pixels; returns the (H', W', 3) uint8 pixels and the box (left, top, right,
    bottom) in their coordinates (floats: a DCT-scaled size is rounded up). `fast_upsample`: see
    `images.decode_rgb_array`."""
    left, top, w, h = box
    pixels = decode_rgb_array(data, min_width=math.ceil(width * size / w), min_height=math.ceil(height * size / h),
                              fast_upsample=fast_upsample)
    sx, sy = pixels.shape[1] / width, pixels.shape[0] / height
    return pixels, (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


SNAP_MAX_REDUCTION = 2
"""DCT reductions up to this one (1/2) have their crop box rounded to whole decoded pixels (`snap_box`)."""


def snap_box(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """`box` (left, top, right, bottom) rounded to whole pixels, for torch's resize kernel (`resize_box`).

    Used on 1/2 DCT-scaled decodes: each edge moves by at most half a decoded pixel, one stored pixel, so the
    crop keeps its drawn position and scale to within one stored pixel; resampling the exact fractional box
    with PIL instead costs about as much as the smaller decode saves (bench/data.py)."""
    return tuple(int(math.floor(v + 0.5)) for v in box)  # type: ignore[return-value]


def resize_box(pixels: np.ndarray, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """The `box` (left, top, right, bottom) of (H, W, 3) uint8 pixels, resized to size x size with PIL's
    antialiased bicubic → uint8 (3, size, size).

    A box on whole pixels (a full-size decode: most COCO-sized and pre-resized images) goes through torch's
    uint8 kernel, which follows Pillow's filter within a grey level at a third of its time; a fractional
    box (after a DCT-domain reduction) through PIL, which resamples it exactly where it lies.
    """
    if all(float(v).is_integer() for v in box):
        if not pixels.flags.writeable:
            pixels = pixels.copy()
        left, top, right, bottom = (int(v) for v in box)
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), a channels-last view
        x = x[:, :, top:bottom, left:right]  # (1, 3, h, w)
        return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return to_uint8_tensor(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, box=box))


class CropSpec(NamedTuple):
    """A training crop once its draws are made: the box (left, top, w, h) in the stored image's pixels, and
    whether to mirror it. Drawn by `TrainTransform.draw`; applied on the CPU by `TrainTransform` or on the
    GPU by `blip_train.data.device.decode_crops`."""
    box: tuple[int, int, int, int]
    flip: bool


class TrainTransform:
    """RandomResizedCrop(image_size, scale=(crop_scale_min, 1), bicubic) → optional h-flip → uint8 (3, S, S).

    Normalisation happens on the batch, on the device (`normalize_pixels`).
    """

    def __init__(self, image_size: int, crop_scale_min: float = 0.5, hflip: bool = True) -> None:
        if not 0.0 < crop_scale_min <= 1.0:
            raise ValueError(f"data.crop_scale_min must be in (0, 1], got {crop_scale_min}")
        self.image_size = image_size
        self.scale = (crop_scale_min, 1.0)
        self.hflip = hflip

    def draw(self, width: int, height: int, generator: Optional[torch.Generator] = None) -> CropSpec:
        """The crop box, then the flip: the draws, in the order, of the full-size reference."""
        box = random_resized_crop_box(width, height, self.scale, generator=generator)
        return CropSpec(box, bool(self.hflip and torch.rand(1, generator=generator).item() < 0.5))

    def crop_bytes(self, data: bytes, width: int, height: int, spec: CropSpec) -> torch.Tensor:
        """Decode (DCT-scaled), crop, resize (bicubic) and maybe mirror stored image bytes → uint8 (3, S, S)."""
        pixels, box = decode_covering(data, width, height, spec.box, self.image_size, fast_upsample=True)
        if pixels.shape[1] * SNAP_MAX_REDUCTION >= width:  # full size (whole pixels already) or 1/2
            box = snap_box(box)
        out = resize_box(pixels, box, self.image_size)
        return out.flip(-1) if spec.flip else out

    def crop_image(self, im: Image.Image, spec: CropSpec) -> torch.Tensor:
        """The same for a decoded PIL image, with PIL's resize: the full-size reference (torchvision's
        RandomResizedCrop on a PIL image)."""
        s, (left, top, w, h) = self.image_size, spec.box
        out = im.convert("RGB").resize((s, s), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if spec.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(out)

    def __call__(self, im: ImageInput, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if isinstance(im, Image.Image):
            return self.crop_image(im, self.draw(im.width, im.height, generator))
        width, height = image_size(im)
        return self.crop_bytes(im, width, height, self.draw(width, height, generator))


EVAL_REDUCING_GAP = 2
"""An evaluation image is DCT-reduced only as far as twice its output size (see EvalTransform)."""


class EvalTransform:
    """Resize to (image_size, image_size) bicubic → normalise (no randomness); float (3, S, S).

    Given stored bytes, a JPEG is decoded at the smallest DCT scale (1/4, 1/8) that keeps at least 2S x 2S
    pixels, then resized by the same antialiased bicubic.
    """

    def __init__(self, image_size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> None:
        self.image_size = image_size
        self.mean, self.std = mean, std

    def __call__(self, im: ImageInput, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        s = self.image_size
        if isinstance(im, Image.Image):
            return to_normalized_tensor(im.convert("RGB").resize((s, s), Image.Resampling.BICUBIC), self.mean, self.std)
        # A DCT reduction only down to twice the output (PIL's thumbnail reducing_gap=2): evaluation scores
        # must compare with the full-size decode's, and a whole image shrinks far less than a crop does.
        pixels = decode_rgb_array(im, min_width=EVAL_REDUCING_GAP * s, min_height=EVAL_REDUCING_GAP * s,
                                  scales=EVAL_DCT_SCALES)
        out = resize_box(pixels, (0, 0, pixels.shape[1], pixels.shape[0]), s)
        return normalize_pixels(out, self.mean, self.std).contiguous()


def build_transform(image_size: int, train: bool, crop_scale_min: float = 0.5,
                    hflip: bool = True) -> TrainTransform | EvalTransform:
    """The training or evaluation transform for `image_size` pixels."""
    if train:
        return TrainTransform(image_size, crop_scale_min, hflip)
    return EvalTransform(image_size)
