"""Evaluation examples for people to look at (TensorBoard, each in-training evaluation).

Retrieval: a few images, each drawn with its top-5 retrieved captions beside it, the true ones marked,
and whether one of them made the top 5. Captioning / VQA: a markdown table of generated captions or
answers beside their references or human answers. The same first images / rows of the split at every
evaluation, so the pictures show one model changing over training.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

EXAMPLE_IMAGES = 4
"""Retrieval examples drawn at each evaluation (the first images of the evaluated split)."""
TABLE_ROWS = 8
"""Rows of the caption / VQA table."""
CANVAS = (640, 176)
"""(width, height) of a retrieval example picture."""
PANEL = 160
"""Side of the square the image is fitted into, left of the captions."""
MARGIN, LINE = 8, 24
TRUE, OTHER, MISS = (0, 120, 0), (50, 50, 50), (170, 0, 0)


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: nothing to install


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text` cut (with "...") to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_retrieval_example(image: Image.Image, image_id: int, top: Sequence[tuple[str, bool]],
                             rank: int) -> np.ndarray:
    """(H, W, 3) uint8 picture, CANVAS sized: `image` fitted into a PANEL square, and beside it a header
    (image_id; the rank of the first true caption, green when within the top 5) and the `top` retrieved
    captions [(caption, is one of the image's own)], best first, the true ones green.

    rank: 0-based rank of the first true caption among all captions (retrieval's `first_correct_ranks`).
    """
    canvas = Image.new("RGB", CANVAS, "white")
    shown = image.convert("RGB")
    shown.thumbnail((PANEL, PANEL), Image.Resampling.BICUBIC)
    if max(shown.size) < PANEL:  # small images (the tests' 32 px) are scaled up to be seen
        scale = PANEL / max(shown.size)
        shown = shown.resize((round(shown.width * scale), round(shown.height * scale)), Image.Resampling.NEAREST)
    canvas.paste(shown, (MARGIN, MARGIN))
    draw = ImageDraw.Draw(canvas)
    x, width = MARGIN * 2 + PANEL, CANVAS[0] - MARGIN * 3 - PANEL
    hit = rank < 5
    header = f"image_id {image_id}: true caption at rank {rank + 1}, {'in' if hit else 'not in'} the top 5"
    draw.text((x, MARGIN), _fit(draw, header, _font(14), width), fill=TRUE if hit else MISS, font=_font(14))
    for k, (caption, correct) in enumerate(top[:5]):
        line = f"{k + 1}. {caption}" + ("  [true]" if correct else "")
        draw.text((x, MARGIN + LINE * (k + 1) + 4), _fit(draw, line, _font(13), width),
                  fill=TRUE if correct else OTHER, font=_font(13))
    return np.asarray(canvas, dtype=np.uint8).copy()


def _cell(text: object) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def caption_table(predictions: Sequence[dict], rows: int = TABLE_ROWS) -> str:
    """Markdown: image_id, generated caption, references (`evaluate_captions`' predictions)."""
    return _table(["image_id", "generated", "references"],
                  [(p["image_id"], p["prediction"], " / ".join(p["references"])) for p in predictions[:rows]])


def vqa_table(predictions: Sequence[dict], rows: int = TABLE_ROWS) -> str:
    """Markdown: question, generated answer, human answers with their counts (`evaluate_vqa`' predictions)."""
    def answers(a: Sequence[str]) -> str:
        return ", ".join(f"{ans} ({n})" if n > 1 else ans for ans, n in Counter(a).most_common())

    return _table(["question_id", "image_id", "question", "generated", "human answers"],
                  [(p["question_id"], p["image_id"], p["question"], p["prediction"], answers(p["answers"]))
                   for p in predictions[:rows]])


def retrieval_examples(predictions: dict, read_image: Callable[[int], Image.Image]) -> dict[str, np.ndarray]:
    """{tag: picture} for the images in `predictions["image_to_text"]` (`ranked_predictions`);
    read_image(i) gives image i of the evaluation."""
    out = {}
    for q in predictions["image_to_text"]:
        top = [(a["caption"], a["text"] in q["correct_texts"]) for a in q["top"]]
        out[f"eval_examples/retrieval_{q['image']}"] = render_retrieval_example(read_image(q["image"]),
                                                                               q["image_id"], top, q["rank"])
    return out
