"""A learnable synthetic dataset: rendered shapes with captions, VQA pairs and instructions.

Each image shows one or two shapes (circle / square / triangle in one of six colours, small or
large, at left / right / top / bottom / center) on a plain or noisy background. Everything the
text says is visible in the pixels, so a tiny model trained for minutes on CPU beats chance on
retrieval, captioning and VQA: that is what the demo needs to show learning.

The fine-tuning split (`patterns=True`, `make demo`'s runs/demo/data_ft) adds one attribute that the
demo's ViT pretraining never saw: a shape is either plain or "striped" (white stripes across it), and
the captions say so. Its scenes come from their own random stream, so the main split is unchanged.

Every sample carries a caption (with several reference phrasings) AND a question/answer; the
`task` column rotates caption → vqa → conversation so instruction tuning sees all three kinds.
Generation is a pure function of (seed, index): the same arguments give the same bytes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from blip_train.data.images import encode_jpeg
from blip_train.data.schema import write_split

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
          "yellow": (235, 215, 30), "purple": (140, 40, 170), "orange": (245, 140, 20)}
POSITIONS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8),
             "center": (0.5, 0.5)}
POSITION_PHRASES = {"left": ("on the left", "at the left"), "right": ("on the right", "at the right"),
                    "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
                    "center": ("in the center", "in the middle")}
PATTERNS = ("plain", "striped")
"""Surface pattern of a shape in the fine-tuning split; only "striped" is named in captions."""
STRIPE_PERIOD = 4  # pixels (2 striped, 2 filled) at any image size: finer than the 8-px ViT patches
SIZES = {"small": 0.09, "large": 0.15}  # radius as a fraction of the image side
NUMBERS = {1: "one", 2: "two"}
DATASET_NAME = "synthetic_shapes"
CAPTION_INSTRUCTIONS = ("describe the image briefly.", "write a short caption for this image.",
                        "what does the picture show?", "give a short description of the image.")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    position: str
    size: str
    pattern: str = "plain"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_scene(rng: random.Random) -> list[Shape]:
    """One or two shapes of different kinds at different positions (so every question has one answer)."""
    n = rng.choice((1, 2))
    kinds = rng.sample(SHAPES, n)
    positions = rng.sample(sorted(POSITIONS), n)
    return [Shape(k, rng.choice(sorted(COLORS)), p, rng.choice(sorted(SIZES))) for k, p in zip(kinds, positions)]


def render_scene(scene: list[Shape], image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene with PIL; background is a random light plain colour or light noise."""
    s = image_size
    if rng.random() < 0.5:
        bg = tuple(rng.randint(200, 250) for _ in range(3))
        im = Image.new("RGB", (s, s), bg)
    else:
        noise = np.random.default_rng(rng.getrandbits(32)).integers(170, 250, (s, s, 3), dtype=np.uint8)
        im = Image.fromarray(noise, "RGB")
    for shape in scene:
        cx, cy = POSITIONS[shape.position]
        cx = (cx + rng.uniform(-0.02, 0.02)) * s
        cy = (cy + rng.uniform(-0.02, 0.02)) * s
        draw_shape(im, shape, cx, cy, SIZES[shape.size] * s)
    return im


def draw_shape(im: Image.Image, shape: Shape, cx: float, cy: float, r: float) -> None:
    """Fill the shape in its colour; a striped one gets white diagonal stripes inside its outline."""
    mask = Image.new("L", im.size, 0)
    draw = ImageDraw.Draw(mask)
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape.kind == "square":
        q = r * 0.9  # same visual mass as the circle
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=255)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=255)
    im.paste(COLORS[shape.color], mask=mask)
    if shape.pattern == "striped":
        # (S, S) diagonal bands, half of each STRIPE_PERIOD white, kept to the shape's outline
        yy, xx = np.mgrid[:im.size[1], :im.size[0]]
        bands = Image.fromarray(np.where((xx + yy) % STRIPE_PERIOD < STRIPE_PERIOD // 2, 255, 0).astype(np.uint8))
        im.paste((255, 255, 255), mask=ImageChops.multiply(mask, bands))


def _describe(shape: Shape, rng: random.Random, with_size: Optional[bool] = None) -> str:
    if with_size is None:
        with_size = rng.random() < 0.5
    words = ([shape.size] if with_size else []) + (["striped"] if shape.pattern == "striped" else []) + \
        [shape.color, shape.kind]
    return f"{_article(words[0])} {' '.join(words)} {rng.choice(POSITION_PHRASES[shape.position])}"


def caption_scene(scene: list[Shape], rng: random.Random) -> str:
    """One phrasing of the scene; the template and word choices vary with `rng`."""
    parts = [_describe(sh, rng) for sh in scene]
    body = parts[0] if len(parts) == 1 else f"{parts[0]} and {parts[1]}"
    template = rng.choice(("{}", "{}", "an image of {}", "there is {}", "a picture showing {}"))
    if len(scene) == 2 and rng.random() < 0.25:
        return f"two shapes: {body}"
    return template.format(body)


def _answers(main: str, alternates: tuple[str, ...], rng: random.Random) -> list[str]:
    """Ten human-style answers: mostly the main one, sometimes one or two alternates (as in VQAv2)."""
    answers = [main] * 10
    if alternates:
        for i in rng.sample(range(10), rng.choice((0, 1, 2))):
            answers[i] = rng.choice(alternates)
    return answers


def question_scene(scene: list[Shape], rng: random.Random) -> tuple[str, str, list[str]]:
    """A question about the scene, its answer, and ten answers."""
    sh = rng.choice(scene)
    kind = rng.choice(("color", "shape", "count", "where", "size", "exists"))
    if kind == "color":
        return f"what color is the {sh.kind}?", sh.color, _answers(sh.color, (), rng)
    if kind == "shape":
        return (f"what shape is {POSITION_PHRASES[sh.position][0]}?", sh.kind,
                _answers(sh.kind, (f"{sh.color} {sh.kind}",), rng))
    if kind == "count":
        word = NUMBERS[len(scene)]
        return "how many shapes are there?", word, _answers(word, (str(len(scene)),), rng)
    if kind == "where":
        return (f"where is the {sh.color} {sh.kind}?", sh.position,
                _answers(sh.position, (POSITION_PHRASES[sh.position][0],), rng))
    if kind == "size":
        return f"is the {sh.kind} small or large?", sh.size, _answers(sh.size, (), rng)
    absent = [k for k in SHAPES if k not in {s.kind for s in scene}]
    target = rng.choice([sh.kind] + absent)
    answer = "yes" if target == sh.kind else "no"
    return f"is there {_article(target)} {target} in the image?", answer, _answers(answer, (), rng)


def conversation_scene(scene: list[Shape], rng: random.Random) -> tuple[str, str]:
    """An open question with a sentence-long answer (instruction-tuning style)."""
    sh = rng.choice(scene)
    question = rng.choice((f"can you tell me about the {sh.kind}?", f"describe the {sh.kind} in the image."))
    answer = f"it is {_describe(sh, rng, with_size=True)}."
    if len(scene) == 2:
        other = next(s for s in scene if s is not sh)
        answer += f" there is also {_article(other.color)} {other.color} {other.kind}."
    return question, answer


def make_sample(index: int, seed: int, image_size: int, patterns: bool = False) -> dict[str, Any]:
    """The clean sample number `index`: a pure function of (seed, index, image_size, patterns).
    patterns=True: the fine-tuning split, scenes from their own stream, whose shapes are plain or striped
    (the first shape alternates with `index`, so exactly half the scenes lead with a striped shape)."""
    # str seeds hash deterministically (sha512), unlike tuples
    rng = random.Random(f"patterns-{seed}-{index}" if patterns else f"{seed}-{index}")
    scene = sample_scene(rng)
    if patterns:
        scene = [replace(sh, pattern=PATTERNS[index % 2] if i == 0 else rng.choice(PATTERNS))
                 for i, sh in enumerate(scene)]
    image = encode_jpeg(render_scene(scene, image_size, rng), quality=95)
    captions = list(dict.fromkeys(caption_scene(scene, rng) for _ in range(5)))
    task = ("caption", "vqa", "conversation")[index % 3]
    if task == "caption":
        question, answer, answers = rng.choice(CAPTION_INSTRUCTIONS), captions[0], [captions[0]]
    elif task == "vqa":
        question, answer, answers = question_scene(scene, rng)
    else:
        question, answer = conversation_scene(scene, rng)
        answers = [answer]
    return {"image": image, "image_id": index, "caption": captions[0], "captions": captions,
            "question": question, "answer": answer, "answers": answers, "task": task,
            "dataset": DATASET_NAME, "question_id": index, "noisy": 0, "source": "synthetic"}


def _with_noise(sample: dict[str, Any], donor: dict[str, Any]) -> dict[str, Any]:
    """Give `sample` the captions of another scene (a web-style mismatched caption) and mark it."""
    out = dict(sample, caption=donor["caption"], captions=donor["captions"], noisy=1)
    if sample["task"] == "caption":  # the caption is also this sample's answer
        out.update(answer=donor["caption"], answers=[donor["caption"]])
    return out


def split_sizes(num_samples: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) sample counts; val is at least 1 when val_fraction > 0 and there are 2+ samples."""
    n_val = int(round(num_samples * val_fraction))
    if val_fraction > 0 and num_samples >= 2:
        n_val = max(1, n_val)
    return num_samples - n_val, min(n_val, num_samples)


def iter_split(split: str, num_samples: int, seed: int = 0, noise_fraction: float = 0.0,
               val_fraction: float = 0.2, image_size: int = 64, patterns: bool = False) -> Iterator[dict[str, Any]]:
    """Samples of `split` ("train" or "val"); val holds the last indices and is never noised."""
    n_train, n_val = split_sizes(num_samples, val_fraction)
    if split == "val":
        for i in range(n_train, n_train + n_val):
            yield make_sample(i, seed, image_size, patterns)
        return
    rng = random.Random(f"{seed}-noise")
    noisy = set(rng.sample(range(n_train), int(round(noise_fraction * n_train))))
    for i in range(n_train):
        sample = make_sample(i, seed, image_size, patterns)
        if i in noisy:
            # The donor is a scene from outside the dataset so that it never equals the own one.
            donor = make_sample(num_samples + i, seed + 1, image_size, patterns)
            sample = _with_noise(sample, donor)
        yield sample


def write_synthetic_dataset(out: str | Path, num_samples: int, seed: int = 0, noise_fraction: float = 0.0,
                            val_fraction: float = 0.2, image_size: int = 64, overwrite: bool = False,
                            on_write: Optional[Callable[[], None]] = None, patterns: bool = False) -> dict[str, Any]:
    """Write `out/train` and `out/val`; return a summary (counts per split, noisy count, task counts).
    patterns=True writes the fine-tuning split (plain / striped shapes, see `make_sample`)."""
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_samples < 1 or image_size < 16:
        raise ValueError("need num_samples >= 1 and image_size >= 16")
    out = Path(out)
    existing = [str(out / s) for s in ("train", "val") if (out / s).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exists; pass --overwrite to replace it")
    summary: dict[str, Any] = {"out": str(out), "seed": seed, "image_size": image_size, "noisy": 0,
                               "tasks": {}, "patterns": patterns}
    for split in ("train", "val"):
        stats = {"noisy": 0, "tasks": {}}

        def counted(it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for s in it:
                stats["noisy"] += s["noisy"]
                stats["tasks"][s["task"]] = stats["tasks"].get(s["task"], 0) + 1
                yield s

        samples = iter_split(split, num_samples, seed, noise_fraction, val_fraction, image_size, patterns)
        summary[split] = write_split(out / split, counted(samples), overwrite=overwrite, on_write=on_write)
        summary["noisy"] += stats["noisy"]
        for k, v in stats["tasks"].items():
            summary["tasks"][k] = summary["tasks"].get(k, 0) + v
    return summary
