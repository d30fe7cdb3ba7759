"""load_and_normalize_image: every kind of bad or unusual image a dataset ships."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from blip_train.data import images as I


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (valid CRC) without the pixel data to back it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def bad_inputs(tmp_path) -> dict:
    """reason -> list of inputs (bytes or paths) that must be skipped with that reason."""
    good_jpeg = encode(Image.new("RGB", (32, 32), (10, 200, 10)), "JPEG")
    (tmp_path / "zero.jpg").write_bytes(b"")
    return {
        I.MISSING_FILE: [str(tmp_path / "nope.jpg")],
        I.EMPTY_FILE: [b"", str(tmp_path / "zero.jpg")],
        I.UNREADABLE: [b"this is not an image", good_jpeg[: len(good_jpeg) // 2],
                       encode(Image.new("RGB", (32, 32)), "PNG")[:60]],
        I.TOO_LARGE: [png_header_only(30000, 10)],
        I.TOO_SMALL: [encode(Image.new("RGB", (4, 40)), "PNG")],
        I.BOMB: [png_header_only(15000, 15000), png_header_only(9800, 9800)],
    }


def test_bad_images_are_skipped_with_their_reason(tmp_path):
    for reason, inputs in bad_inputs(tmp_path).items():
        for src in inputs:
            data, got = I.load_and_normalize_image(src)
            assert (data, got) == (None, reason), (reason, src if isinstance(src, str) else len(src))


def test_rgb_jpeg_and_png_are_kept_byte_for_byte(tmp_path):
    for fmt in ("JPEG", "PNG"):
        raw = encode(Image.new("RGB", (20, 30), (1, 2, 3)), fmt)
        path = tmp_path / f"x.{fmt.lower()}"
        path.write_bytes(raw)
        assert I.load_and_normalize_image(raw) == (raw, "ok")
        assert I.load_and_normalize_image(str(path)) == (raw, "ok")


@pytest.mark.parametrize("make", [
    lambda: encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"),
    lambda: encode(Image.new("L", (24, 24), 128), "PNG"),
    lambda: encode(Image.new("1", (24, 24), 1), "PNG"),
    lambda: encode(Image.new("P", (24, 24), 3), "GIF"),
    lambda: encode(Image.new("RGB", (24, 24), (5, 6, 7)), "BMP"),
    lambda: encode(Image.new("RGB", (24, 24), (5, 6, 7)), "WEBP"),
], ids=["cmyk", "grey", "1bit", "palette", "bmp", "webp"])
def test_other_modes_and_formats_become_rgb_jpeg(make):
    data, reason = I.load_and_normalize_image(make())
    assert reason == "ok"
    im = decoded(data)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (24, 24)


def test_rgba_and_transparent_palette_composite_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half fully transparent black → white
    data, _ = I.load_and_normalize_image(encode(rgba, "PNG"))
    arr = np.asarray(decoded(data)).astype(int)
    assert arr[:, :6].min() > 240 and arr[:, 10:, 0].min() > 230 and arr[:, 10:, 1].max() < 30

    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    data, _ = I.load_and_normalize_image(encode(pal, "PNG", transparency=1))  # index 1 transparent
    assert np.asarray(decoded(data)).min() > 240


def test_16bit_greyscale_is_rescaled_not_clipped():
    arr = np.full((16, 16), 32768, dtype=np.uint16)  # mid-grey in 16 bit
    data, reason = I.load_and_normalize_image(encode(Image.fromarray(arr), "PNG"))
    assert reason == "ok"
    px = np.asarray(decoded(data))
    assert decoded(data).mode == "RGB" and abs(int(px.mean()) - 127) <= 2


def test_exif_rotation_and_resize():
    im = Image.new("RGB", (40, 20), (9, 9, 9))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    data, _ = I.load_and_normalize_image(encode(im, "JPEG", exif=exif.tobytes()))
    assert decoded(data).size == (20, 40)
    data, _ = I.load_and_normalize_image(encode(Image.new("RGB", (400, 100)), "PNG"), resize_max_side=100)
    assert decoded(data).size == (100, 25)


def test_downscale_to_a_short_side_keeps_small_images_and_their_bytes():
    from tests.unit.test_data_transforms import photo

    big = encode(photo(1600, 1200), "JPEG", quality=93)
    data, _ = I.load_and_normalize_image(big, resize_short_side=512)
    assert decoded(data).size == (683, 512) and len(data) < len(big) / 2
    # JPEGs are decoded at a DCT scale keeping >= 2x the final size: as good as resizing the full decode
    full = np.asarray(Image.open(io.BytesIO(big)).convert("RGB").resize((683, 512), Image.Resampling.BICUBIC))
    assert np.abs(np.asarray(decoded(data), dtype=float) - full).mean() < 2.0
    portrait, _ = I.load_and_normalize_image(encode(photo(900, 2000), "PNG"), resize_short_side=512)
    assert decoded(portrait).size == (512, 1138)
    both, _ = I.load_and_normalize_image(encode(photo(900, 2000), "PNG"), resize_short_side=512, resize_max_side=800)
    assert decoded(both).size == (360, 800)
    small = encode(photo(640, 480), "JPEG")
    assert I.load_and_normalize_image(small, resize_short_side=512)[0] == small  # within bounds: byte for byte
    assert I.load_and_normalize_image(big, resize_short_side=0)[0] == big  # 0: originals


def test_downscale_after_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 1200 x 800, shown 800 x 1200
    data, _ = I.load_and_normalize_image(encode(Image.new("RGB", (1200, 800), (9, 9, 9)), "JPEG", exif=exif.tobytes()),
                                         resize_short_side=400)
    assert decoded(data).size == (400, 600)


def test_plain_chroma_upsampling_only_on_reduced_decodes():
    """fast_upsample changes pixels only where the decode is DCT-reduced: an image the loader keeps at full
    size (the demo's 64 px scenes) decodes exactly as without it."""
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 60, (64, 64, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)  # 4:2:0, as the demo's scenes
    data = buf.getvalue()
    exact = I.decode_rgb_array(data, min_width=64, min_height=64)
    assert np.array_equal(I.decode_rgb_array(data, min_width=64, min_height=64, fast_upsample=True), exact)
    import simplejpeg
    assert not np.array_equal(simplejpeg.decode_jpeg(data, "rgb", fastupsample=True), exact)  # it would differ
