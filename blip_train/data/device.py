"""The last step of a batch's image pipeline, on the training device: `finish_batch`.

The training loader hands over images as uint8 (3, S, S) crops (`data.decode: cpu`), or, with
`data.decode: gpu`, as the encoded JPEG bytes with their crop box and flip already drawn in the
workers (`EncodedCrop`). After the trainer has moved a batch to its device, `finish_batch` decodes
what is still encoded (nvJPEG through `torchvision.io.decode_jpeg`, the whole batch in one call) and
crops/resizes/mirrors it there, then normalises every image to CLIP-normalised float32. Models only
ever see normalised floats; the trainer only calls `finish_batch` after `_to_device`.

The draws (box, flip) come from the same per-sample generator and in the same order as the CPU path's,
so both decoders train on the same crops of the same images; they differ only in resampling (the GPU
always decodes at full size and uses torch's antialiased bicubic, as the CPU path does for full-size
decodes; the CPU path reduces large JPEGs in the DCT domain first, see transforms.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blip_train.config.loading import ConfigError
from blip_train.data.images import CorruptImageError, decode_rgb_array, encode_jpeg, image_size, is_jpeg
from blip_train.data.transforms import CropSpec, TrainTransform, normalize_pixels

DECODERS = ("cpu", "gpu")
"""data.decode: where training JPEGs are decoded (cpu: in the DataLoader workers; gpu: nvJPEG on the device)."""


@dataclass
class EncodedCrop:
    """A training image left for the device to decode: its JPEG bytes, stored size, drawn crop and the
    side of the square it becomes."""
    data: bytes
    width: int
    height: int
    spec: CropSpec
    size: int


@dataclass
class JpegCrops:
    """The encoded images of a batch (`data.decode: gpu`): which rows of `pixel_values` they fill,
    their bytes (host uint8 tensors: nvJPEG reads them from host memory), crop boxes and flips."""
    rows: list[int]
    data: list[torch.Tensor]
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]


class GpuDecodeTransform(TrainTransform):
    """The training transform of `data.decode: gpu`: draws the crop in the worker and leaves the decode to
    the device. Only the JPEG header is read here; images that are not JPEG, or whose stream does not end
    with the end-of-image marker (cut short: decoded here, so they are counted as corrupt and skipped
    like on the CPU path), go through the CPU transform."""

    def __call__(self, im: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor | EncodedCrop:
        if not isinstance(im, (bytes, bytearray)) or not is_jpeg(im) or im[-2:] != b"\xff\xd9":
            return super().__call__(im, generator)
        width, height = image_size(im)
        return EncodedCrop(bytes(im), width, height, self.draw(width, height, generator), self.image_size)


def build_train_transform(image_size: int, crop_scale_min: float, hflip: bool, decode: str) -> TrainTransform:
    """The training transform for `data.decode` (cpu | gpu)."""
    if decode not in DECODERS:
        raise ValueError(f"data.decode must be one of {DECODERS}, got {decode!r}")
    cls = GpuDecodeTransform if decode == "gpu" else TrainTransform
    return cls(image_size, crop_scale_min, hflip)


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{"pixel_values": (B, 3, S, S)} from the samples' images, and "jpeg_crops" (`JpegCrops`) when some are
    left encoded for the device; their rows of pixel_values are zeros until `finish_batch` fills them.
    Keeps the dtype: uint8 from the training transforms, float from the evaluation transform."""
    images = [s["pixel_values"] for s in samples]
    encoded = [(i, im) for i, im in enumerate(images) if isinstance(im, EncodedCrop)]
    if not encoded:
        return {"pixel_values": torch.stack(images)}
    size = encoded[0][1].size
    pixels = torch.zeros(len(images), 3, size, size, dtype=torch.uint8)
    for i, im in enumerate(images):
        if not isinstance(im, EncodedCrop):
            pixels[i] = im
    crops = JpegCrops(rows=[i for i, _ in encoded],
                      data=[torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for _, e in encoded],
                      boxes=[e.spec.box for _, e in encoded], flips=[e.spec.flip for _, e in encoded])
    return {"pixel_values": pixels, "jpeg_crops": crops}


def decode_crops(crops: JpegCrops, size: int, device: torch.device) -> torch.Tensor:
    """Decode a batch's JPEGs on `device` (nvJPEG on CUDA, in one batched call), crop each to its box, resize
    to size x size (bicubic, antialiased) and mirror where drawn → uint8 (N, 3, size, size) on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 marks its image codecs deprecated (in favour of TorchCodec)
        warnings.simplefilter("ignore")
        try:
            images = decode_jpeg(crops.data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            # One image nvJPEG cannot decode fails the batch: decode one by one, on the host where needed.
            images = [_decode_one(d, device) for d in crops.data]
    out = []
    for img, (left, top, w, h), flip in zip(images, crops.boxes, crops.flips):
        crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()  # (1, 3, h, w)
        resized = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)[0]  # (3, size, size)
        out.append(resized.flip(-1) if flip else resized)
    return torch.stack(out)  # (N, 3, size, size)


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pixels = decode_rgb_array(data.numpy().tobytes())  # raises CorruptImageError for bad bytes
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).to(device)


def finish_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Complete a batch's images on the device its `pixel_values` are on: decode what `data.decode: gpu` left
    encoded, then normalise uint8 pixels to CLIP-normalised float32 (float pixels, e.g. from evaluation
    transforms, pass unchanged). Call after moving the batch to the device."""
    pixels = batch.get("pixel_values")
    if pixels is None:
        return batch
    crops: Optional[JpegCrops] = batch.get("jpeg_crops")
    out = {k: v for k, v in batch.items() if k != "jpeg_crops"}
    if crops is not None:
        pixels[torch.tensor(crops.rows, device=pixels.device)] = decode_crops(crops, pixels.shape[-1], pixels.device)
    if pixels.dtype == torch.uint8:
        pixels = normalize_pixels(pixels)
    out["pixel_values"] = pixels
    return out


def check_gpu_decode(device: torch.device) -> None:
    """Refuse `data.decode: gpu` in one line where JPEGs cannot be decoded on `device` (no CUDA, or a
    torchvision without nvJPEG): decodes a tiny JPEG there once."""
    if device.type != "cuda":
        raise ConfigError(f"data.decode: gpu needs a CUDA device (this run is on {device.type}); use data.decode=cpu")
    data = encode_jpeg(Image.new("RGB", (16, 16), (200, 30, 60)))
    crops = JpegCrops([0], [torch.frombuffer(bytearray(data), dtype=torch.uint8)], [(0, 0, 16, 16)], [False])
    try:
        decode_crops(crops, 8, device)
    except (RuntimeError, CorruptImageError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.decode: gpu: torchvision cannot decode JPEGs on {device} ({first}); "
                          "use data.decode=cpu") from None
