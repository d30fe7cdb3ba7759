"""CapFilt's thresholds from data, not from how well one head happens to be calibrated.

A fixed P(match) >= 0.5 assumes a well-calibrated ITM head; an under-trained one (the demo's) never
reaches 0.5 and the filter keeps nothing. Instead both thresholds are set at the same quantile q of
their head's scores on web captions, with q chosen so that a target share of the pairs passes both:

* `clean_reference` (`--calibrate-on SPLIT`): scores of a small split whose captions are known to be
  right (e.g. COCO val); the target is the share of clean pairs to keep (`--clean-keep`, 0.9).
* `keep_rate` (the default): scores of the input's own web captions; the target is the share to keep
  (`--keep-rate`, 0.75: web alt-text is roughly a quarter noise).
* `fixed`: thresholds given with --itm-threshold / --itc-threshold.

Scores come from the first `samples` rows in split order, in fixed batches, so the thresholds are a
function of (model, split, rule) alone: every rank computes the same ones and a resumed run finds them
again.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from blip_train.data.collate import pre_caption
from blip_train.data.images import CorruptImageError, decode_rgb
from blip_train.data.transforms import build_transform

RULES = ("keep_rate", "clean_reference", "fixed")


@dataclass(frozen=True)
class ThresholdRule:
    """How the thresholds were chosen (printed, and kept in the report and the resume identity)."""

    rule: str
    target: Optional[float] = None
    """keep_rate: share of the input's web captions to keep; clean_reference: share of clean pairs kept."""
    calibrated_on: Optional[str] = None
    """The split the scores came from (keep_rate: the input)."""
    samples: int = 0
    """Web captions scored."""
    quantile: Optional[float] = None
    """The quantile q both thresholds sit at."""
    itm_threshold: float = 0.0
    itc_threshold: Optional[float] = None
    achieved: Optional[float] = None
    """Share of the scored pairs that pass both thresholds."""

    def describe(self) -> str:
        itc = "off" if self.itc_threshold is None else f"{self.itc_threshold:.4f}"
        if self.rule == "fixed":
            return f"thresholds (given): ITM P(match) >= {self.itm_threshold:.4f}, ITC >= {itc}"
        what = "of the input's web captions" if self.rule == "keep_rate" else f"of the clean pairs of {self.calibrated_on}"
        return (f"thresholds ({self.rule}: keep {self.target:.0%} {what}; both heads at their {self.quantile:.3f} "
                f"quantile over {self.samples} captions, {self.achieved:.1%} pass): ITM P(match) >= "
                f"{self.itm_threshold:.4f}, ITC >= {itc}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def web_caption_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]],
                       image_size: int, max_txt_len: int, batch_size: int = 16) -> np.ndarray:
    """(N, 2) array of (ITM P(match), ITC similarity) for the rows' own captions (rows without one or
    with an undecodable image are left out)."""
    from blip_train.capfilt.capfilt import score_captions

    transform = build_transform(image_size, train=False)
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    usable = []
    for row in rows:
        text = pre_caption(row.get("caption") or "")
        if not text:
            continue
        try:
            usable.append((transform(decode_rgb(row["image"])), text))
        except CorruptImageError:
            continue
    for start in range(0, len(usable), batch_size):
        chunk = usable[start:start + batch_size]
        embeds, feats = model.encode_image(torch.stack([px for px, _ in chunk]).to(device))
        itm, itc = score_captions(model, tokenizer, embeds, feats, [t for _, t in chunk], range(len(chunk)),
                                  max_txt_len)
        out += zip(itm, itc)
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def joint_quantile(scores: np.ndarray, target: float) -> tuple[float, float, float, float]:
    """(q, itm threshold, itc threshold, share passing): the largest q at which at least `target` of the
    pairs score >= the q-quantile of both heads (thresholds are observed scores: 'lower' quantiles)."""
    if not len(scores):
        raise ValueError("capfilt: no captions to set thresholds on (no web captions, or no decodable images)")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"capfilt: the share to keep must be in (0, 1], got {target}")

    def passing(q: float) -> tuple[float, float, float]:
        t_itm = float(np.quantile(scores[:, 0], q, method="lower"))
        t_itc = float(np.quantile(scores[:, 1], q, method="lower"))
        return t_itm, t_itc, float(np.mean((scores[:, 0] >= t_itm) & (scores[:, 1] >= t_itc)))

    lo, hi = 0.0, 1.0 - target  # q = 0 keeps everything; each head alone keeps >= 1 - q
    for _ in range(40):
        mid = (lo + hi) / 2
        if passing(mid)[2] >= target:
            lo = mid
        else:
            hi = mid
    t_itm, t_itc, share = passing(lo)
    return lo, t_itm, t_itc, share


def calibrate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, split: str, rule: str, target: float,
              samples: int, image_size: int, max_txt_len: int, batch_size: int = 16) -> ThresholdRule:
    """Score the first `samples` web captions of `split` and set both thresholds (see the module doc)."""
    from streaming import LocalDataset

    from blip_train.data.schema import verify_split

    verify_split(split)
    ds = LocalDataset(split)
    rows = [dict(ds[i]) for i in range(min(samples, len(ds)))]
    scores = web_caption_scores(model, tokenizer, rows, image_size, max_txt_len, batch_size)
    q, t_itm, t_itc, share = joint_quantile(scores, target)
    return ThresholdRule(rule, target, split, len(scores), round(q, 6), t_itm, t_itc, round(share, 4))
