"""Image transforms: shapes, CLIP normalisation, determinism under a generator, and the DCT-scaled decode
path against the full-size reference: same crop boxes and flips, the same crop distribution, close pixels."""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from blip_train.data import images as I
from blip_train.data import transforms as T
from blip_train.data.transforms import (CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, build_transform,
                                        normalize_pixels, random_resized_crop_box)


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def photo(width: int, height: int) -> Image.Image:
    """A real photograph (matplotlib's sample of Grace Hopper, 512 x 600) resized to width x height."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


def jpeg(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_eval_resizes_and_normalises():
    im = Image.new("RGB", (50, 30), (255, 0, 128))
    x = EvalTransform(32)(im)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 16, 16], expected, atol=1e-5)


def test_train_gives_uint8_and_the_batch_is_normalised_as_before():
    x = TrainTransform(32)(_image(), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    batch = torch.stack([x, x])  # (2, 3, 32, 32)
    expected = (x.float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(normalize_pixels(batch)[1], expected, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(batch.float())


def test_train_is_deterministic_under_a_generator_and_random_without():
    t = TrainTransform(32, crop_scale_min=0.5, hflip=True)
    a = t(_image(), generator=torch.Generator().manual_seed(3))
    b = t(_image(), generator=torch.Generator().manual_seed(3))
    c = t(_image(), generator=torch.Generator().manual_seed(4))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    data = jpeg(photo(300, 200))
    assert torch.equal(t(data, torch.Generator().manual_seed(5)), t(data, torch.Generator().manual_seed(5)))


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
        x = no_flip(im, generator=torch.Generator().manual_seed(seed)).float()
        assert x[0, :, :8].mean() > x[0, :, 24:].mean()
    flip = TrainTransform(32, crop_scale_min=1.0, hflip=True)
    flipped = [bool(flip(im, generator=torch.Generator().manual_seed(s))[0, :, :8].float().mean() < 128)
               for s in range(16)]
    assert any(flipped) and not all(flipped)
    assert isinstance(build_transform(32, train=False), EvalTransform)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def test_dct_scaled_decode_keeps_the_reference_crops_and_their_pixels(monkeypatch):
    """From stored bytes, the transform draws exactly the boxes and flips of the full-size reference (decode,
    then crop) for the same seed, decodes large JPEGs at 1/4 or 1/2 size when the crop allows, and yields
    nearly the same pixels: those of the drawn box, or at 1/2 of the box rounded to whole decoded pixels
    (within one stored pixel of the drawn one, `test_snapped_box_stays_within_one_stored_pixel_of_the_drawn_one`)."""
    t = TrainTransform(224, crop_scale_min=0.5)
    decoded_widths = []
    real = I.decode_rgb_array

    def spy(data, min_width=0, min_height=0, **kwargs):
        out = real(data, min_width, min_height, **kwargs)
        decoded_widths.append(out.shape[1])
        return out

    monkeypatch.setattr(T, "decode_rgb_array", spy)
    for size in [(1600, 1200), (1024, 1365), (640, 480), (768, 512)]:
        data = jpeg(photo(*size))
        reference = I.decode_rgb(data)
        for seed in range(6):
            spec_ref = t.draw(reference.width, reference.height, torch.Generator().manual_seed(seed))
            spec_new = t.draw(*I.image_size(data), torch.Generator().manual_seed(seed))
            assert spec_new == spec_ref
            ours = t(data, torch.Generator().manual_seed(seed))
            ref = t.crop_image(reference, spec_ref)
            assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == torch.uint8
            diff = (ours.float() - ref.float()).abs().mean()
            if decoded_widths[-1] == size[0]:  # full size: torch's kernel against PIL's, plain chroma upsampling
                assert diff < 0.5
                continue
            if 2 * decoded_widths[-1] >= size[0]:  # 1/2: the reference is the snapped box, in stored pixels
                sx = decoded_widths[-1] / size[0]
                sy = -(-size[1] // 2) / size[1]
                left, top, w, h = spec_ref.box
                snapped = T.snap_box((left * sx, top * sy, (left + w) * sx, (top + h) * sy))
                box = (snapped[0] / sx, snapped[1] / sy, (snapped[2] - snapped[0]) / sx, (snapped[3] - snapped[1]) / sy)
                ref = t.crop_image(reference, T.CropSpec(box, spec_ref.flip))
                diff = (ours.float() - ref.float()).abs().mean()
            assert _psnr(ours, ref) > 30 and diff < 3.0
    assert 400 in decoded_widths[:6]  # 1600 x 1200: crops of >= 896 px decode at 1/4
    assert set(decoded_widths[12:18]) == {640}  # 640 x 480, these seeds: a crop at 1/2 would be < 224 px
    assert set(decoded_widths[18:]) == {384, 768}  # 768 x 512 (a pre-resized shard's size): 1/2 or full size


def test_snapped_box_stays_within_one_stored_pixel_of_the_drawn_one():
    g = torch.Generator().manual_seed(0)
    t = TrainTransform(224)
    for width, height in [(768, 512), (683, 512), (511, 767)]:
        decoded = (-(-width // 2), -(-height // 2))
        for _ in range(50):
            left, top, w, h = t.draw(width, height, g).box
            sx, sy = decoded[0] / width, decoded[1] / height
            exact = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            snapped = T.snap_box(exact)
            assert all(isinstance(v, int) for v in snapped)
            assert all(abs(a - b) <= 0.5 for a, b in zip(snapped, exact))  # half a decoded pixel
            assert 0 <= snapped[0] < snapped[2] <= decoded[0] and 0 <= snapped[1] < snapped[3] <= decoded[1]


def test_crop_distribution_matches_torchvision_random_resized_crop():
    """Scale and aspect ratio of the boxes (drawn from the header's size, as the decode path does) stay in
    RandomResizedCrop's ranges, with its distribution: quantiles against torchvision's own draws."""
    from torchvision.transforms import RandomResizedCrop

    data = jpeg(photo(1024, 768))
    width, height = I.image_size(data)
    t = TrainTransform(224, crop_scale_min=0.5)
    g = torch.Generator().manual_seed(0)
    ours = np.array([t.draw(width, height, g).box[2:] for _ in range(4000)], dtype=float)  # (N, 2): w, h
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    theirs = np.array([RandomResizedCrop.get_params(img, [0.5, 1.0], [3 / 4, 4 / 3])[2:][::-1]
                       for _ in range(4000)], dtype=float)  # get_params gives (top, left, h, w)
    for boxes in (ours, theirs):
        scale = boxes[:, 0] * boxes[:, 1] / (width * height)
        ratio = boxes[:, 0] / boxes[:, 1]
        assert scale.min() >= 0.5 * 0.99 and scale.max() <= 1.0
        assert ratio.min() >= 0.75 * 0.99 and ratio.max() <= 4 / 3 * 1.01
    for stat in (lambda b: b[:, 0] * b[:, 1] / (width * height), lambda b: np.log(b[:, 0] / b[:, 1])):
        q_ours, q_theirs = np.quantile(stat(ours), [0.1, 0.25, 0.5, 0.75, 0.9]), \
            np.quantile(stat(theirs), [0.1, 0.25, 0.5, 0.75, 0.9])
        assert np.abs(q_ours - q_theirs).max() < 0.03


def test_eval_transform_from_bytes_matches_the_full_size_decode(monkeypatch):
    """Evaluation decodes DCT-reduced only down to twice its output size: within a grey level of the
    full-size decode's result."""
    widths = []
    real = I.decode_rgb_array
    monkeypatch.setattr(T, "decode_rgb_array", lambda *a, **k: widths.append(real(*a, **k).shape[1]) or real(*a, **k))
    for size in [(3000, 2250), (1280, 960), (500, 375)]:
        data = jpeg(photo(*size))
        fast, full = EvalTransform(224)(data), EvalTransform(224)(I.decode_rgb(data))
        assert fast.shape == full.shape == (3, 224, 224)
        # in normalised units: 1/255 / 0.27 ~ 0.0145 per grey level
        assert (fast - full).abs().mean() < 0.0145
    assert widths == [750, 1280, 500]  # 3000 px: 1/4 still leaves >= 448 px; 1280: 1/4 would not


def test_decode_falls_back_to_pil_and_refuses_bad_bytes():
    im = photo(120, 80)
    png = io.BytesIO()
    im.save(png, format="PNG")
    assert I.decode_rgb_array(png.getvalue(), 30, 30).shape == (80, 120, 3)  # not a JPEG: full size, PIL
    cmyk = io.BytesIO()
    im.convert("CMYK").save(cmyk, format="JPEG")
    assert I.decode_rgb_array(cmyk.getvalue()).shape == (80, 120, 3)  # libjpeg-turbo refuses CMYK; PIL does it
    grey = jpeg(im.convert("L"))
    assert I.decode_rgb_array(grey).shape == (80, 120, 3)
    assert I.image_size(png.getvalue()) == I.image_size(grey) == (120, 80)
    data = jpeg(photo(640, 480))
    assert I.decode_rgb_array(data, 80, 60).shape == (60, 80, 3)  # 1/8
    assert I.decode_rgb_array(data, 160, 120).shape == (120, 160, 3)  # 1/4
    assert I.decode_rgb_array(data, 161, 120).shape == (240, 320, 3)  # 1/2
    assert I.decode_rgb_array(data, 321, 120).shape == (480, 640, 3)  # n/8 scales are not used: full size
    assert I.decode_rgb_array(data, 161, 120, scales=I.EVAL_DCT_SCALES).shape == (480, 640, 3)  # evaluation: no 1/2
    assert I.dct_scaled_size(641, 481, 0, 0) == (81, 61)  # rounded up, as libjpeg-turbo does
    for bad in (b"\xff\xd8\xff not a jpeg", data[: len(data) // 2], b"GIF89a"):
        with pytest.raises(I.CorruptImageError):
            I.decode_rgb_array(bad, 10, 10)
    with pytest.raises(I.CorruptImageError):
        TrainTransform(32)(data[: len(data) // 2], torch.Generator().manual_seed(0))
