"""`make bench`, data part: images/s per worker core of the stage-1 input pipeline, side by side in one run.

    python bench/data.py                   # standalone; bench/run.py runs it first

MDS splits of real photographs (the sample photos shipped inside scikit-image's wheel and matplotlib's,
7 of them) in three sizes, derived by crops, rescales and collages and re-encoded as JPEG at quality
90-95:
  coco         640 x 480 (or 480 x 640), as COCO's images;
  web          longer side 1024-2048 px, as CC3M/CC12M/LAION downloads (half single photos rescaled,
               half 2 x 2 / 3 x 3 collages, so that detail per pixel stays that of a photo);
  web_resized  the web images as the converters store them by default (shorter side 512).
Measured on each split, per core (1 torch thread, num_workers=0, this process only):
  (a) decode      the stored bytes decoded at full size: PIL, and libjpeg-turbo (simplejpeg) straight into
                  numpy. Nothing that must decode every pixel of these bytes is faster.
  (b) lavis       the pipeline LAVIS users run: PIL decode + torchvision RandomResizedCrop(224, scale 0.5-1,
                  bicubic) + RandomHorizontalFlip + ToTensor + Normalize, per image.
  (c) ours        our stage-1 training loader end to end: MDS shards -> build_train_loader (stage-1
                  collator, micro-batch 32, data.decode=cpu) -> collated batch (uint8 images, tokenised
                  captions); each image is stored 4 times, so that an epoch is long enough for streaming's
                  per-epoch start not to weigh on the figure. Plus, for information, the worker's share of
                  data.decode=gpu (the header and the draws; the decode happens on the GPU).
The pixels (c) trains on are compared with the full-size reference (PIL decode, then PIL's bicubic on
the same boxes): the mean absolute difference in grey levels (of 255).
(a), (b) and (c) alternate within every repetition (a b c, then c b a, ...): load from other processes
hits all alike; the table reports medians, the ratios are medians of per-repetition ratios. Each repetition
is also timed in CPU seconds of this process (all its threads): on a machine shared with other jobs the
wall-clock figures move with their load, the CPU-time ratios much less; both are printed.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import print_markdown_table  # noqa: E402
from blip_train.data.images import (RESIZE_SHORT_SIDE, decode_rgb, decode_rgb_array,  # noqa: E402
                                    load_and_normalize_image)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPLITS = ("coco", "web", "web_resized")


def sample_photographs() -> list[Image.Image]:
    """Real photographs that ship inside installed packages: scikit-image's (astronaut, cat, coffee, rocket,
    motorcycle left/right) and matplotlib's Grace Hopper. Without scikit-image (not a dev install), only the
    latter."""
    import matplotlib

    photos = [Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")]
    try:
        import skimage.data as sk
    except ImportError:
        return photos
    arrays = [sk.astronaut(), sk.chelsea(), sk.coffee(), sk.rocket(), *sk.stereo_motorcycle()[:2]]
    return photos + [Image.fromarray(a).convert("RGB") for a in arrays]


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _cover(im: Image.Image, width: int, height: int, rng: random.Random) -> Image.Image:
    """A width x height crop of `im` rescaled (bicubic) to cover it, at a random position."""
    scale = max(width / im.width, height / im.height) * rng.uniform(1.0, 1.15)
    big = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))),
                    Image.Resampling.BICUBIC)
    left, top = rng.randint(0, big.width - width), rng.randint(0, big.height - height)
    return big.crop((left, top, left + width, top + height))


def coco_like(photos: list[Image.Image], n: int, rng: random.Random) -> list[bytes]:
    out = []
    for i in range(n):
        w, h = (640, 480) if rng.random() < 0.75 else (480, 640)
        out.append(_jpeg(_cover(photos[i % len(photos)], w, h, rng), rng.randint(90, 95)))
    return out


def web_like(photos: list[Image.Image], n: int, rng: random.Random) -> list[bytes]:
    out = []
    for i in range(n):
        long_side = rng.randint(1024, 2048)
        aspect = rng.choice((4 / 3, 3 / 2, 16 / 9, 1.0))
        w, h = long_side, round(long_side / aspect)
        if rng.random() < 0.25:
            w, h = h, w
        if i % 2 == 0:  # one photo rescaled
            im = _cover(photos[i % len(photos)], w, h, rng)
        else:  # a collage of photos at about their own scale: a photo's detail per pixel
            g = 2 if long_side < 1536 else 3
            im = Image.new("RGB", (w, h))
            cw, ch = -(-w // g), -(-h // g)
            for k in range(g * g):
                cell = _cover(photos[rng.randrange(len(photos))], cw, ch, rng)
                im.paste(cell, ((k % g) * cw, (k // g) * ch))
        out.append(_jpeg(im, rng.randint(90, 95)))
    return out


def build_images(n: int, seed: int = 0) -> dict[str, list[bytes]]:
    rng = random.Random(seed)
    photos = sample_photographs()
    web = web_like(photos, n, rng)
    resized = [load_and_normalize_image(b, resize_short_side=RESIZE_SHORT_SIDE)[0] for b in web]
    return {"coco": coco_like(photos, n, rng), "web": web, "web_resized": resized}


def write_splits(images: dict[str, list[bytes]], root: Path, repeat: int = 1) -> dict[str, str]:
    """One MDS split per entry, each image stored `repeat` times (an epoch long enough that streaming's
    per-epoch start does not weigh on the per-image figure, as in a real epoch of millions)."""
    from blip_train.data.schema import make_sample, write_split

    words = ("a", "photo", "of", "the", "astronaut", "cat", "coffee", "rocket", "motorcycle", "woman", "on", "table")
    paths = {}
    for name, blobs in images.items():
        rng = random.Random(name)
        rows = (make_sample(b, image_id=i, caption=" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))),
                            dataset=name) for i, b in enumerate(blobs * repeat))
        paths[name] = str(root / name)
        write_split(paths[name], rows)
    return paths


def build_tokenizer(root: Path):
    from blip_train.data.tokenizers import load_qformer_tokenizer, train_wordpiece_tokenizer

    train_wordpiece_tokenizer(["a photo of the astronaut cat coffee rocket motorcycle woman on table"], 256,
                              root / "tokenizer")
    return load_qformer_tokenizer(root / "tokenizer")


def lavis_transform(image_size: int = 224):
    from torchvision import transforms as tv

    return tv.Compose([tv.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=tv.InterpolationMode.BICUBIC),
                       tv.RandomHorizontalFlip(), tv.ToTensor(), tv.Normalize(CLIP_MEAN, CLIP_STD)])


def build_loader(split: str, tokenizer, batch_size: int, decode: str = "cpu"):
    from blip_train.config.schema import DataConfig, StreamConfig
    from blip_train.data.collate import Stage1Collator
    from blip_train.data.datasets import build_train_loader
    from blip_train.data.device import GpuDecodeTransform

    cfg = DataConfig(train=[StreamConfig(local=split)], image_size=224, num_workers=0, shuffle_seed=1)
    loader = build_train_loader(cfg, batch_size, Stage1Collator(tokenizer, 32))
    if decode == "gpu":  # what data.decode=gpu runs in the workers (the loader refuses gpu without CUDA)
        loader.dataset.transform = GpuDecodeTransform(224, cfg.crop_scale_min, cfg.hflip)
    return loader


@dataclass
class SplitResult:
    name: str
    images: int
    mean_pixels: float
    bits_per_pixel: float
    seconds: dict[str, list[float]] = field(default_factory=dict)
    """Per method, seconds per image of each repetition."""
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)
    """The same in CPU seconds of this process (`time.process_time`)."""
    grey_levels_vs_reference: float = 0.0
    """Mean |ours - full-size PIL reference| over the split's crops, in grey levels."""

    def per_s(self, key: str) -> float:
        return 1.0 / statistics.median(self.seconds[key])

    def ratio(self, num: str, den: str, cpu: bool = False) -> float:
        """Median over repetitions of (images/s of num) / (images/s of den), in wall-clock or CPU time."""
        times = self.cpu_seconds if cpu else self.seconds
        return statistics.median(d / n for n, d in zip(times[num], times[den]))


def difference_from_reference(blobs: list[bytes], image_size: int = 224) -> float:
    """Mean absolute difference (grey levels) between our crops of the stored bytes and the full-size
    reference's crops (PIL decode, PIL bicubic) for the same draws."""
    from blip_train.data.transforms import TrainTransform

    t = TrainTransform(image_size)
    diffs = []
    for i, b in enumerate(blobs):
        full = decode_rgb(b)
        spec = t.draw(full.width, full.height, torch.Generator().manual_seed(i))
        ours, ref = t.crop_bytes(b, full.width, full.height, spec), t.crop_image(full, spec)
        diffs.append(float((ours.float() - ref.float()).abs().mean()))
    return statistics.mean(diffs)


def measure_split(name: str, blobs: list[bytes], split: str, tokenizer, reps: int, batch_size: int,
                  warmup: int = 1) -> SplitResult:
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    pixels = [w * h for w, h in sizes]
    result = SplitResult(name, len(blobs), statistics.mean(pixels),
                         statistics.mean(8 * len(b) / p for b, p in zip(blobs, pixels)))
    result.grey_levels_vs_reference = difference_from_reference(blobs)
    lavis = lavis_transform()
    loaders = {"ours": build_loader(split, tokenizer, batch_size),
               "ours_gpu_decode_worker": build_loader(split, tokenizer, batch_size, "gpu")}

    def over_bytes(fn: Callable[[bytes], object]) -> Callable[[], int]:
        def run() -> int:
            for b in blobs:
                fn(b)
            return len(blobs)
        return run

    def over_loader(key: str) -> Callable[[], int]:
        def run() -> int:
            n = 0
            for batch in loaders[key]:  # one epoch: shards -> samples -> collated batches
                n += batch["pixel_values"].shape[0]
            return n
        return run

    methods: dict[str, Callable[[], int]] = {
        "decode_pil": over_bytes(decode_rgb),
        "decode_turbo": over_bytes(decode_rgb_array),
        "lavis": over_bytes(lambda b: lavis(Image.open(io.BytesIO(b)).convert("RGB"))),
        "ours": over_loader("ours"),
        "ours_gpu_decode_worker": over_loader("ours_gpu_decode_worker"),
    }
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    names = list(methods)
    result.seconds, result.cpu_seconds = {k: [] for k in names}, {k: [] for k in names}
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            n = methods[k]()
            result.seconds[k].append((time.perf_counter() - t0) / n)
            result.cpu_seconds[k].append((time.process_time() - c0) / n)
    return result


def print_table(results: list[SplitResult]) -> None:
    head = ["split", "images", "mean px", "bits/px", "(a) decode PIL", "(a) decode turbo", "(b) LAVIS", "(c) ours",
            "(c)/(b)", "(c)/(a) PIL", "(c)/(a) turbo", "gpu decode: worker", "(c) vs ref"]
    lines = [head]
    for r in results:
        lines.append([r.name, str(r.images), f"{r.mean_pixels / 1e6:.2f} M", f"{r.bits_per_pixel:.2f}",
                      f"{r.per_s('decode_pil'):.0f}/s", f"{r.per_s('decode_turbo'):.0f}/s", f"{r.per_s('lavis'):.0f}/s",
                      f"{r.per_s('ours'):.0f}/s", f"{r.ratio('ours', 'lavis'):.2f}x", f"{r.ratio('ours', 'decode_pil'):.2f}x",
                      f"{r.ratio('ours', 'decode_turbo'):.2f}x", f"{r.per_s('ours_gpu_decode_worker'):.0f}/s",
                      f"{r.grey_levels_vs_reference:.2f}"])
    print_markdown_table(lines)
    cpu = [["split", "(c)/(b) cpu", "(c)/(a) PIL cpu", "(c)/(a) turbo cpu"]]
    for r in results:
        cpu.append([r.name] + [f"{r.ratio('ours', k, cpu=True):.2f}x" for k in ("lavis", "decode_pil", "decode_turbo")])
    print_markdown_table(cpu)


def summary(results: list[SplitResult], device: str) -> dict:
    """The data bench's JSON line: images/s per core and the paired ratios, per split."""
    return {
        "bench": "blip-train-data", "date": str(datetime.date.today()), "device": device,
        "images_per_s_per_core": {r.name: {k: round(r.per_s(k), 1) for k in r.seconds} for r in results},
        "grey_levels_vs_reference": {r.name: round(r.grey_levels_vs_reference, 3) for r in results},
        "ratios": {r.name: {"ours_vs_lavis": round(r.ratio("ours", "lavis"), 3),
                            "ours_vs_decode_pil": round(r.ratio("ours", "decode_pil"), 3),
                            "ours_vs_decode_turbo": round(r.ratio("ours", "decode_turbo"), 3)} for r in results},
        "ratios_cpu_time": {r.name: {"ours_vs_lavis": round(r.ratio("ours", "lavis", cpu=True), 3),
                                     "ours_vs_decode_pil": round(r.ratio("ours", "decode_pil", cpu=True), 3),
                                     "ours_vs_decode_turbo": round(r.ratio("ours", "decode_turbo", cpu=True), 3)}
                            for r in results},
    }


def describe_cpu() -> str:
    return f"CPU: {os.cpu_count()} cores ({platform.machine()}), 1 thread per measured pipeline"


def run_data_bench(images_per_split: int = 64, reps: int = 5, batch_size: int = 32, repeat: int = 4,
                   splits: tuple[str, ...] = SPLITS, root: Optional[Path] = None) -> dict:
    """Build the splits, measure, print the table and the JSON line; return the JSON summary."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="blip_bench_data_") as tmp:
        root = root or Path(tmp)
        images = {k: v for k, v in build_images(images_per_split).items() if k in splits}
        paths = write_splits(images, root, repeat)
        tokenizer = build_tokenizer(root)
        stored, original = sum(map(len, images.get("web_resized", []))), sum(map(len, images.get("web", [])))
        print(f"blip-train data bench | {datetime.date.today()} | {describe_cpu()} | torch {torch.__version__}")
        print(f"{images_per_split} images per split (from {len(sample_photographs())} photographs), JPEG q90-95; "
              f"batch {batch_size}, an epoch of (c) reads each image {repeat}x; {reps} timed reps after 1 warm-up" +
              (f"; web_resized stores {stored / max(1, original):.0%} of web's bytes" if stored and original else ""))
        results = [measure_split(name, images[name], paths[name], tokenizer, reps, batch_size) for name in images]
    print_table(results)
    print("images/s: one core, medians of the timed reps; ratios: medians of per-rep ratios (each rep ran "
          "(a), (b), (c) back to back). (c) includes shard reading, tokenisation and collation; (a) and (b) do not. "
          "(c) vs ref: mean |difference| from the full-size PIL crops of the same boxes, in grey levels. "
          "Second table: the same ratios in CPU seconds of this process, less moved by other processes' load.")
    out = summary(results, describe_cpu())
    print(json.dumps(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64, help="images per split (a multiple of the batch size)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=4, help="times each image is stored in the split (c) reads")
    args = p.parse_args()
    run_data_bench(args.images, args.reps, args.batch_size, args.repeat)


if __name__ == "__main__":
    main()
