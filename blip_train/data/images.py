"""Turning whatever image a dataset ships into the RGB JPEG/PNG bytes the schema stores.

Web-scale data contains everything: CMYK JPEGs, palette PNGs with transparency, 16-bit greyscale
scans, zero-byte downloads, truncated files, 1x1 tracking pixels and decompression bombs. Converters
call `load_and_normalize_image` once per image (in worker processes) and count the reasons for
skipping; training then never needs to handle any of it.
"""
from __future__ import annotations

import io
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

# Skip reasons (stable strings: converters report and tests check them).
OK = "ok"
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable_image"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
BOMB = "decompression_bomb"

MAX_SIDE = 20000
MIN_SIDE = 8
# PIL's own warning threshold (~89.5 Mpx); more pixels than this is treated as a bomb.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
JPEG_QUALITY = 95


def _to_8bit_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white (as a browser shows it)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float greyscale: PIL's convert("L") clips instead of rescaling.
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode.startswith("I") and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


RESIZE_SHORT_SIDE = 512
"""Converters' default stored size: images whose shorter side exceeds this are downscaled to it. 512 px
still gives the training crops (224 px, scale 0.5-1) more pixels than they keep, and the fine-tuning
sizes (364, 490) a full-resolution centre; a web photo of 1024-2048 px shrinks to a quarter or less of
its bytes and decodes that much faster, epoch after epoch."""


def resize_scale(width: int, height: int, short_side: int = 0, max_side: int = 0) -> float:
    """The factor (<= 1) that brings the shorter side down to `short_side` and the longer one to `max_side`
    (0: no bound); 1 when the image is within both (images are never enlarged)."""
    scale = 1.0
    if short_side > 0:
        scale = min(scale, short_side / min(width, height))
    if max_side > 0:
        scale = min(scale, max_side / max(width, height))
    return scale


def load_and_normalize_image(src: Union[bytes, str, os.PathLike], *, max_side: int = MAX_SIDE,
                             min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS,
                             resize_short_side: int = 0, resize_max_side: int = 0) -> tuple[Optional[bytes], str]:
    """Return `(encoded RGB image bytes, "ok")` or `(None, reason)`; never raises on bad input.

    Untouched RGB JPEG/PNG files are stored byte for byte (no re-compression loss); everything
    else (other modes, EXIF rotation, downscaling by `resize_scale(resize_short_side, resize_max_side)`)
    is re-encoded as JPEG. A JPEG to be downscaled is decoded at a DCT scale that keeps at least twice
    the final size (PIL's draft; the bicubic resize then reduces by 2x or more, as PIL's thumbnail does).
    """
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            return None, MISSING_FILE
        try:
            data = path.read_bytes()
        except OSError:
            return None, UNREADABLE
    else:
        data = bytes(src)
    if not data:
        return None, EMPTY_FILE
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and twice that: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if max(w, h) > max_side:
                return None, TOO_LARGE
            if w * h > max_pixels:
                return None, BOMB
            if min(w, h) < min_side:
                return None, TOO_SMALL
            fmt = im.format
            scale = resize_scale(w, h, resize_short_side, resize_max_side)
            if scale < 1 and fmt == "JPEG":
                im.draft(im.mode, (math.ceil(2 * w * scale), math.ceil(2 * h * scale)))
            im.load()  # full decode: catches truncated and corrupt files here, not in training
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, BOMB
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error)
        return None, UNREADABLE

    rotated = im
    try:
        if im.getexif().get(0x0112, 1) not in (0, 1):  # EXIF Orientation: camera photos stored sideways
            rotated = ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF must not cost us the image
        rotated = im
    if fmt in ("JPEG", "PNG") and im.mode == "RGB" and rotated is im and scale == 1:
        return data, OK
    try:
        out = _to_8bit_rgb(rotated)
        if scale < 1:
            turned = rotated.size != im.size  # EXIF rotation by 90 degrees swaps the sides
            width, height = (h, w) if turned else (w, h)
            out = out.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    except Exception:
        return None, UNREADABLE
    return buf.getvalue(), OK


class CorruptImageError(ValueError):
    """Stored image bytes that do not decode. Readers skip and count these, and nothing else: a bug in
    a transform must surface as an error, not as a growing count of "corrupt" samples."""


_PIL_DECODE_ERRORS = (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError, struct.error)
"""What PIL's decoders raise for bad bytes (UnidentifiedImageError is an OSError)."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode stored image bytes to an RGB PIL image; CorruptImageError when they do not decode."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # the full decode: truncated data fails here, not later in a transform
        return im if im.mode == "RGB" else im.convert("RGB")
    except _PIL_DECODE_ERRORS as e:
        raise CorruptImageError(f"{type(e).__name__}: {e}") from e


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of stored image bytes from their header alone (no pixel is decoded)."""
    if is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height
        except ValueError:
            pass  # a JPEG libjpeg-turbo's header reader refuses: PIL may still read it
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except _PIL_DECODE_ERRORS as e:
        raise CorruptImageError(f"{type(e).__name__}: {e}") from e


DCT_SCALES = (8, 4, 2)
"""JPEG decode reductions used for training crops: 1/8, 1/4 and 1/2 (else full size). libjpeg-turbo also
scales by n/8, but 5/8-7/8 have no SIMD inverse DCT: on the data bench's 512 px photographs they cost
12-45% more than a full decode. 1/2 saves about a sixth of such a decode (the entropy decoding that every
scale pays is most of the rest), and pays off only because its crop is then resized by torch's kernel on
whole decoded pixels (`transforms.snap_box`): PIL's resize of the exact fractional box costs about three
times torch's, as much as the smaller decode saves."""

EVAL_DCT_SCALES = (8, 4)
"""Reductions for whole-image evaluation decodes (which keep at least twice the output size): unchanged
from before 1/2 was used for training crops, so that evaluation scores stay comparable across versions."""


def dct_scaled_size(width: int, height: int, min_width: int, min_height: int,
                    scales: tuple[int, ...] = DCT_SCALES) -> tuple[int, int]:
    """The smallest (width, height) a JPEG decodes to, by one of `scales` (reductions 1/r, tried from the
    largest) or 1, that is at least min_width x min_height (libjpeg-turbo's scaled size: ceil(side / r))."""
    for r in scales:
        w, h = -(-width // r), -(-height // r)
        if w >= min_width and h >= min_height:
            return w, h
    return width, height


def decode_rgb_array(data: bytes, min_width: int = 0, min_height: int = 0,
                     scales: tuple[int, ...] = DCT_SCALES, fast_upsample: bool = False) -> np.ndarray:
    """Decode stored image bytes to an RGB uint8 array (H, W, 3), as small as `min_width` x `min_height` allow.

    JPEGs are decoded by libjpeg-turbo (simplejpeg) straight into the array, scaled down in the DCT domain
    (`dct_scaled_size` with `scales`) when the minimum allows: the inverse DCT then computes fewer,
    low-passed pixels, which costs less than decoding every pixel and resizing afterwards. With no minimum
    the size is kept. `fast_upsample`: libjpeg-turbo's plain (not "fancy", i.e. triangular) chroma
    upsampling, merged with the colour conversion: about 6% less decode time on 4:2:0 photos, and about a
    quarter of a grey level of difference once a crop is resized to 224 px (measured on the data bench's
    pre-resized photographs); used only for decodes that are DCT-reduced, so images the loader keeps at
    full size (e.g. the demo's 64 px scenes) decode exactly as the reference does. Other formats, and
    JPEGs libjpeg-turbo refuses (CMYK, recoverable stream errors PIL tolerates), are decoded by PIL at full
    size. CorruptImageError when the bytes do not decode.
    """
    if is_jpeg(data):
        try:
            if min_width > 0 or min_height > 0:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                w, h = dct_scaled_size(width, height, min_width, min_height, scales)
                # simplejpeg picks the smallest scale whose result is at least (w, h): exactly 1/r. Plain
                # upsampling only where the decode is reduced anyway: a full-size decode stays the reference's.
                fast = fast_upsample and (w, h) != (width, height)
                return simplejpeg.decode_jpeg(data, "rgb", fastupsample=fast, min_width=w, min_height=h)
            return simplejpeg.decode_jpeg(data, "rgb", fastupsample=fast_upsample)
        except ValueError:
            pass
    return np.asarray(decode_rgb(data))


def encode_jpeg(im: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Encode a PIL image as JPEG bytes (deterministic for identical pixels)."""
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
