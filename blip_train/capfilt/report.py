"""CapFilt counters and fixed-bin score histograms: additive per chunk, merged into one report.

Histograms use fixed bins (not data-dependent ones) so that the histograms of chunks processed on
different ranks, or before and after a restart, add up exactly to those of one uninterrupted run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

COUNTERS = (
    "images",                 # input samples processed (decodable or not)
    "undecodable",            # samples skipped because their image could not be decoded
    "web_kept", "web_dropped",
    "web_empty",              # samples without a web caption (nothing to filter)
    "noisy_web", "noisy_web_dropped",  # web captions flagged noisy=1 in the input, and how many the filter dropped
    "clean_web", "clean_web_kept",     # web captions flagged noisy=0, and how many the filter kept
    "synthetic_generated",    # captions sampled (num_captions per image)
    "synthetic_empty",        # sampled captions that decoded to no text
    "synthetic_duplicates",   # repeats of another sampled caption or of the web caption
    "synthetic_candidates",   # top-`keep_top` by ITC that went to the ITM filter
    "synthetic_kept",
    "captions_kept",          # web + synthetic captions kept (an image's are stored together in one row)
    "rows",                   # output rows written: images that kept at least one caption
)

# name -> (low, high, bins). ITM is a probability; ITC the cosine similarity (max over queries).
HISTOGRAMS = {
    "itm_web_clean": (0.0, 1.0, 10), "itm_web_noisy": (0.0, 1.0, 10), "itm_synthetic": (0.0, 1.0, 10),
    "itc_web_clean": (-1.0, 1.0, 20), "itc_web_noisy": (-1.0, 1.0, 20), "itc_synthetic": (-1.0, 1.0, 20),
}


@dataclass
class Histogram:
    """Counts of values in `bins` equal bins over [low, high]; values outside go to the end bins."""

    low: float
    high: float
    bins: int
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * self.bins

    def add(self, values: Iterable[float]) -> None:
        scale = self.bins / (self.high - self.low)
        for v in values:
            if not math.isfinite(v):
                continue  # a NaN score fails every threshold (dropped) and has no bin
            b = math.floor((v - self.low) * scale)
            self.counts[min(max(b, 0), self.bins - 1)] += 1

    def merge_(self, other: "Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]

    def as_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "counts": list(self.counts)}

    def render(self, width: int = 40) -> list[str]:
        """One text line per bin, `[lo, hi)  count  ####`, from the first to the last non-empty bin."""
        step = (self.high - self.low) / self.bins
        peak = max(self.counts) or 1
        used = [i for i, c in enumerate(self.counts) if c] or [0]
        return [f"  [{self.low + i * step:+.2f}, {self.low + (i + 1) * step:+.2f})  {self.counts[i]:>7}  "
                f"{'#' * round(width * self.counts[i] / peak)}" for i in range(used[0], used[-1] + 1)]


@dataclass
class CapFiltStats:
    """Counters and histograms of some chunks; `merge_` adds another chunk's."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    histograms: dict[str, Histogram] = field(
        default_factory=lambda: {k: Histogram(*spec) for k, spec in HISTOGRAMS.items()})

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def merge_(self, other: "CapFiltStats") -> None:
        for k, v in other.counts.items():
            self.counts[k] += v
        for k, h in other.histograms.items():
            self.histograms[k].merge_(h)

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "histograms": {k: h.counts for k, h in self.histograms.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CapFiltStats":
        stats = cls()
        stats.counts.update(data["counts"])
        for k, counts in data["histograms"].items():
            stats.histograms[k].counts = list(counts)
        return stats


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def build_report(stats: CapFiltStats, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: images seen, web kept/dropped, synthetic kept, noise rates, histograms."""
    c = stats.counts
    web_scored = c["web_kept"] + c["web_dropped"]
    report: dict[str, Any] = {
        "images_seen": c["images"],
        "images_undecodable": c["undecodable"],
        "rows_written": c["rows"],
        "images_kept_rate": _rate(c["rows"], c["images"] - c["undecodable"]),
        "captions_kept": c["captions_kept"],
        "web": {"kept": c["web_kept"], "dropped": c["web_dropped"], "no_caption": c["web_empty"],
                "kept_rate": _rate(c["web_kept"], web_scored)},
        "synthetic": {"generated": c["synthetic_generated"], "empty": c["synthetic_empty"],
                      "duplicates": c["synthetic_duplicates"], "candidates": c["synthetic_candidates"],
                      "kept": c["synthetic_kept"],
                      "kept_per_image": _rate(c["synthetic_kept"], c["images"] - c["undecodable"])},
    }
    if c["noisy_web"]:  # the input knows which captions are wrong (synthetic noise): score the filter
        report["noise"] = {
            "noisy_web": c["noisy_web"], "noisy_dropped": c["noisy_web_dropped"],
            "noisy_drop_rate": _rate(c["noisy_web_dropped"], c["noisy_web"]),
            "clean_web": c["clean_web"], "clean_kept": c["clean_web_kept"],
            "clean_keep_rate": _rate(c["clean_web_kept"], c["clean_web"]),
        }
    report["thresholds"] = (settings.get("thresholds") or {}).get("description")
    report["histograms"] = {k: h.as_dict() for k, h in stats.histograms.items() if sum(h.counts)}
    report["settings"] = settings
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of a report (the JSON holds the same numbers)."""
    web, syn = report["web"], report["synthetic"]
    lines = [
        f"{'images seen':<28}{report['images_seen']}",
        f"{'images undecodable':<28}{report['images_undecodable']}",
        f"{'web captions kept':<28}{web['kept']}",
        f"{'web captions dropped':<28}{web['dropped']}",
        f"{'samples without caption':<28}{web['no_caption']}",
        f"{'synthetic generated':<28}{syn['generated']} ({syn['duplicates']} duplicates, {syn['empty']} empty)",
        f"{'synthetic kept':<28}{syn['kept']} of {syn['candidates']} top candidates",
        f"{'rows written (images kept)':<28}{report['rows_written']} "
        f"({100 * (report.get('images_kept_rate') or 0):.1f}% of the decodable images; "
        f"{report.get('captions_kept', 0)} captions)",
    ]
    if report.get("thresholds"):
        lines.append(f"{'thresholds':<28}{report['thresholds']}")
    noise = report.get("noise")
    if noise:
        lines += [f"{'noisy web dropped':<28}{noise['noisy_dropped']}/{noise['noisy_web']} "
                  f"({100 * noise['noisy_drop_rate']:.1f}%)",
                  f"{'clean web kept':<28}{noise['clean_kept']}/{noise['clean_web']} "
                  f"({100 * (noise['clean_keep_rate'] or 0):.1f}%)"]
    for name, h in report["histograms"].items():
        hist = Histogram(h["low"], h["high"], len(h["counts"]), list(h["counts"]))
        lines += [f"{name}:"] + hist.render()
    return "\n".join(lines)
