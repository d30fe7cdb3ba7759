"""A synthetic audio captioning dataset: tones whose pitch, rhythm and motion the captions name.

Each clip (2 s at 16 kHz unless asked otherwise) holds one sound over faint noise:
    pitch    low (~220 Hz) | middle (~880 Hz) | high (~3.5 kHz), jittered by up to a semitone
    pattern  steady | beeping (on and off 4 times a second) | rising | falling (an octave over the clip)
    loudness quiet | loud
and its caption says all three ("a loud high beeping", "a quiet low tone rising"). 24 kinds of clip, so a
captioner that ignores the sound scores what the most common words earn; each property is heard in the
filterbank: pitch in which mel bins carry energy, the pattern in how that changes over frames, loudness in
the level. Rows are audio rows of the schema (data/audio.py: FLAC, the spectrogram as `image`); generation is a
pure function of (seed, index).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from blip_train.data.audio import AUDIO_COLUMNS, SAMPLE_RATE, audio_columns
from blip_train.data.schema import write_split
from blip_train.data.synthetic import split_sizes

PITCHES = {"low": 220.0, "middle": 880.0, "high": 3520.0}
PATTERNS = ("steady", "beeping", "rising", "falling")
LOUDNESS = {"quiet": 0.08, "loud": 0.5}
DATASET_NAME = "synthetic_tones"


def describe(pitch: str, pattern: str, loudness: str) -> str:
    if pattern == "beeping":
        return f"a {loudness} {pitch} beeping"
    if pattern == "steady":
        return f"a {loudness} steady {pitch} tone"
    return f"a {loudness} {pitch} tone {pattern}"


def make_tone(pitch: str, pattern: str, loudness: str, seconds: float, rng: random.Random) -> np.ndarray:
    """The clip's waveform at SAMPLE_RATE, float32 in [-1, 1]."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    base = PITCHES[pitch] * 2 ** (rng.uniform(-1, 1) / 12)
    if pattern in ("rising", "falling"):
        octaves = t / seconds if pattern == "rising" else 1 - t / seconds
        freq = base / 1.414 * 2 ** octaves  # an octave around the named pitch
    else:
        freq = np.full(n, base)
    wave = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi))
    if pattern == "beeping":
        wave *= (np.floor(t * 8 + rng.random()) % 2 == 0)  # 4 beeps a second
    gain = LOUDNESS[loudness] * rng.uniform(0.8, 1.2)
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(n) * 0.01
    return np.clip(gain * wave + noise, -1, 1).astype(np.float32)


def make_clip(index: int, seed: int, seconds: float = 2.0) -> dict[str, Any]:
    """One clip and its caption (a schema audio row)."""
    rng = random.Random(f"tones-{seed}-{index}")
    pitch, pattern, loudness = rng.choice(sorted(PITCHES)), rng.choice(PATTERNS), rng.choice(sorted(LOUDNESS))
    caption = describe(pitch, pattern, loudness)
    return {**audio_columns(make_tone(pitch, pattern, loudness, seconds, rng)), "image_id": index,
            "caption": caption, "captions": [caption], "task": "caption", "dataset": DATASET_NAME,
            "source": "synthetic"}


def write_synthetic_audio_dataset(out: str | Path, num_samples: int, seed: int = 0, seconds: float = 2.0,
                                  val_fraction: float = 0.2, overwrite: bool = False,
                                  on_write: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Write `out/train` and `out/val` (audio splits of `seconds`-long clips); return the counts."""
    n_train, n_val = split_sizes(num_samples, val_fraction)

    def clips(first: int, n: int) -> Iterator[dict[str, Any]]:
        return (make_clip(i, seed, seconds) for i in range(first, first + n))

    out = Path(out)
    return {"out": str(out), "seconds": seconds, "seed": seed,
            "train": write_split(out / "train", clips(0, n_train), overwrite=overwrite, on_write=on_write,
                                 extra_columns=AUDIO_COLUMNS),
            "val": write_split(out / "val", clips(n_train, n_val), overwrite=overwrite, on_write=on_write,
                               extra_columns=AUDIO_COLUMNS)}
