"""Audio samples in the MDS schema: the waveform at 16 kHz mono, stored losslessly, and its log-mel filterbank.

An audio split is a split of the one schema (data/schema.py) with extra columns (AUDIO_COLUMNS):
    image          the clip's log-mel spectrogram as a picture (JPEG), so image readers, inspection tools and
                   TensorBoard examples work unchanged and show what the model hears
    audio          the waveform, FLAC (16-bit, mono, SAMPLE_RATE): lossless at about half of raw PCM
    audio_seconds  its duration
The waveform, not the filterbank, is stored: the audio encoders differ in window and normalisation (BEATs:
Povey window, AST: Hann), a 10-s clip's filterbank takes about 10 ms on one core (under a GPU step's share of
a loader worker), and its FLAC is several times smaller than the float32 filterbank of the same clip.

Features (`log_mel_fbank`): Kaldi's fbank as BEATs and AST compute it (25-ms frames every 10 ms, a 512-point
FFT, DC offset removed, pre-emphasis 0.97, 128 mel bins from 20 Hz to Nyquist on Kaldi's mel scale, natural log
floored at float32's epsilon), on the waveform in 16-bit integer scale for BEATs. X-InstructBLIP cuts the
filterbank into 2 segments of 512 frames (5.12 s each, zero-padded) and encodes each on its own
(`fbank_segments`), as video frames are.

Decoding at conversion uses PyAV (FFmpeg): any container, the audio track of a video file included, resampled
to 16 kHz mono by FFmpeg's resampler.
"""
from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from blip_train.data.images import CorruptImageError

AUDIO_COLUMNS: dict[str, str] = {"audio": "bytes", "audio_seconds": "float64"}
"""Extra MDS columns of an audio split (write_split(extra_columns=...))."""

SAMPLE_RATE = 16000
"""BEATs', AST's and CLAP's rate: converters resample every clip to it."""

FRAME_LENGTH, FRAME_SHIFT, FFT_LENGTH = 400, 160, 512
"""Kaldi fbank at 16 kHz: 25-ms frames, 10-ms shift, the frame rounded up to a power of two for the FFT."""

MISSING_AUDIO = "missing_audio"
EMPTY_AUDIO = "empty_audio"
CORRUPT_AUDIO = "corrupt_audio"
NOT_AUDIO = "not_audio"
SILENT_AUDIO = "silent_audio"
TOO_SHORT_AUDIO = "too_short_audio"

MIN_SECONDS = FRAME_LENGTH / SAMPLE_RATE
"""A clip shorter than one filterbank frame has no features at all."""
SILENCE_PEAK = 1.0 / (1 << 15)
"""A clip whose peak is below one step of 16-bit audio stores as zeros: nothing to hear."""


def decode_audio_file(path: Union[str, os.PathLike], max_seconds: float = 0.0) -> tuple[Optional[np.ndarray], str]:
    """(float32 mono waveform at SAMPLE_RATE in [-1, 1], "ok") of an audio file or a video file's audio track,
    the first `max_seconds` (0: all); or (None, reason) for a missing, empty, corrupt, silent or too-short file,
    or one without audio. Never raises on bad input."""
    import av

    p = Path(path)
    if not p.is_file():
        return None, MISSING_AUDIO
    if p.stat().st_size == 0:
        return None, EMPTY_AUDIO
    chunks: list[np.ndarray] = []
    limit = int(max_seconds * SAMPLE_RATE) if max_seconds > 0 else None
    try:
        with av.open(str(p)) as container:
            if not container.streams.audio:
                return None, NOT_AUDIO
            resampler, have = None, 0
            for frame in container.decode(audio=0):
                # channels kept through the resampler and averaged after (FFmpeg's own downmix adds them at
                # -3 dB each: a stereo clip would come out 41% louder than its mono twin)
                resampler = resampler or av.AudioResampler(format="fltp", layout=frame.layout.name, rate=SAMPLE_RATE)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))
                    have += chunks[-1].size
                if limit is not None and have >= limit:
                    break
            else:
                if resampler is not None:  # flush
                    chunks += [out.to_ndarray().mean(axis=0) for out in resampler.resample(None)]
    except (av.FFmpegError, ValueError, OSError):
        return None, CORRUPT_AUDIO
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    wave = np.clip(wave[:limit], -1.0, 1.0).astype(np.float32)
    if wave.size < MIN_SECONDS * SAMPLE_RATE:
        return None, TOO_SHORT_AUDIO if wave.size else CORRUPT_AUDIO
    if float(np.abs(wave).max()) < SILENCE_PEAK:
        return None, SILENT_AUDIO
    return wave, "ok"


def encode_flac(wave: np.ndarray) -> bytes:
    """A float waveform in [-1, 1] at SAMPLE_RATE as 16-bit mono FLAC bytes."""
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> torch.Tensor:
    """Stored FLAC bytes -> float32 waveform (samples,) in [-1, 1]; ValueError unless mono at SAMPLE_RATE."""
    import soundfile

    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE or wave.shape[1] != 1:
        raise ValueError(f"stored audio is {wave.shape[1]} channel(s) at {rate} Hz; converters store mono at "
                         f"{SAMPLE_RATE} Hz (convert it again with tools/convert_audio_captions.py)")
    return torch.from_numpy(wave[:, 0])


def _mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)  # Kaldi's mel scale


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int = 128, sample_rate: int = SAMPLE_RATE, low_freq: float = 20.0) -> torch.Tensor:
    """(FFT_LENGTH // 2 + 1, num_bins) triangular filters, evenly spaced and triangular on Kaldi's mel scale
    from `low_freq` to Nyquist, unnormalised (Kaldi's, and so BEATs' and AST's)."""
    fft_freqs = torch.arange(FFT_LENGTH // 2 + 1, dtype=torch.float64) * sample_rate / FFT_LENGTH
    edges = torch.linspace(float(_mel(torch.tensor(low_freq))), float(_mel(torch.tensor(sample_rate / 2.0))),
                           num_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    mel = _mel(fft_freqs)[:, None]
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0).to(torch.float32)


@functools.lru_cache(maxsize=4)
def _window(name: str) -> torch.Tensor:
    hann = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float64)
    if name == "povey":
        return hann.pow(0.85).to(torch.float32)  # Kaldi's default, BEATs'
    if name == "hanning":
        return hann.to(torch.float32)  # AST's
    raise ValueError(f"window {name!r}: povey | hanning")


def log_mel_fbank(wave: torch.Tensor, num_bins: int = 128, window: str = "povey") -> torch.Tensor:
    """(frames, num_bins) Kaldi log-mel filterbank of a mono waveform at SAMPLE_RATE (frames without padding at
    the ends, as Kaldi's snip_edges). Scale the waveform as the encoder expects (BEATs: 16-bit integer range)."""
    if wave.numel() < FRAME_LENGTH:
        raise ValueError(f"{wave.numel()} samples: a filterbank needs at least {FRAME_LENGTH}")
    frames = wave.to(torch.float32).unfold(0, FRAME_LENGTH, FRAME_SHIFT)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # Kaldi repeats the first sample
    frames = (frames - 0.97 * previous) * _window(window)
    power = torch.fft.rfft(frames, n=FFT_LENGTH).abs().pow(2)
    mel = power @ kaldi_mel_banks(num_bins)
    return torch.log(torch.clamp(mel, min=torch.finfo(torch.float32).eps))


def fbank_segments(fbank: torch.Tensor, segments: int, length: int) -> torch.Tensor:
    """(segments, length, bins): the first segments * length frames, cut in order, zero-padded at the end
    (X-InstructBLIP's audio frames: 2 x 512)."""
    out = fbank.new_zeros(segments * length, fbank.shape[1])
    n = min(fbank.shape[0], out.shape[0])
    out[:n] = fbank[:n]
    return out.view(segments, length, fbank.shape[1])


AST_MEAN, AST_STD = -4.2677393, 4.5689974
"""transformers' ASTFeatureExtractor defaults (AudioSet statistics), used when a folder has no preprocessor config."""


class CorruptAudioError(CorruptImageError):
    """Stored audio bytes that do not decode: readers skip and count the sample as they do an undecodable image."""


@dataclass(frozen=True)
class AudioFeatures:
    """How a stored clip becomes the audio encoder's input: the Kaldi filterbank of the waveform in [-1, 1] with a
    Hann window (AST's features), cut into `segments` pieces of `frames` frames (zero-padded at the end), then
    normalised as AST normalises its input: (x - mean) / (2 * std), padding included."""
    segments: int
    frames: int
    bins: int
    mean: float = AST_MEAN
    std: float = AST_STD
    kind: str = "audio"
    """What it reads, in the loaders' log lines."""

    def __call__(self, row: dict[str, Any]) -> torch.Tensor:
        """(segments, frames, bins) float32 from a row's `audio` column (FLAC)."""
        if row.get("audio") is None:
            raise ValueError(f"model.modality=audio, but a row of dataset {row.get('dataset', '?')!r} has no audio "
                             "column: convert the split with tools/convert_audio_captions.py")
        try:
            wave = decode_flac(row["audio"])
        except Exception as e:  # soundfile's errors name no file; the reader adds the sample
            raise CorruptAudioError(f"undecodable FLAC ({type(e).__name__}: {e})") from None
        if wave.numel() < FRAME_LENGTH:
            raise CorruptAudioError(f"{wave.numel()} samples, fewer than one {FRAME_LENGTH}-sample frame")
        segments = fbank_segments(log_mel_fbank(wave, self.bins, window="hanning"), self.segments, self.frames)
        return (segments - self.mean) / (2 * self.std)


def audio_features(encoder: str, segments: int) -> AudioFeatures:
    """The features of the ASTModel folder `encoder` (model.audio.encoder): bins and frames per segment from its
    config.json (num_mel_bins, max_length), mean and std from its preprocessor_config.json when it has one."""
    import json

    folder = Path(encoder)
    cfg = json.loads((folder / "config.json").read_text())
    pre = folder / "preprocessor_config.json"
    norm = json.loads(pre.read_text()) if pre.is_file() else {}
    if norm and not norm.get("do_normalize", True):
        raise ValueError(f"{pre}: do_normalize is false; the audio encoders this project loads take normalised input")
    return AudioFeatures(segments=segments, frames=int(cfg.get("max_length", 1024)),
                         bins=int(cfg.get("num_mel_bins", 128)), mean=float(norm.get("mean", AST_MEAN)),
                         std=float(norm.get("std", AST_STD)))


def model_audio_features(model: Any) -> Optional[AudioFeatures]:
    """The features a run's model reads (`model`: the config's ModelConfig) when model.modality=audio, else None."""
    return audio_features(model.audio.encoder, model.audio.segments) if model.modality == "audio" else None


def spectrogram_jpeg(fbank: torch.Tensor, height: int = 128) -> bytes:
    """A filterbank as a picture: time left to right, low frequencies at the bottom, loudest white."""
    from PIL import Image

    from blip_train.data.images import encode_jpeg

    x = fbank.T.flip(0).numpy()
    lo, hi = np.percentile(x, 1), float(x.max())
    grey = np.uint8(np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 255)
    img = Image.fromarray(grey).convert("RGB")
    if img.height != height:
        img = img.resize((max(1, math.ceil(img.width * height / img.height)), height))
    return encode_jpeg(img)


def audio_columns(wave: np.ndarray) -> dict[str, Any]:
    """The stored columns of a float waveform at SAMPLE_RATE: {"image" (its spectrogram), "audio" (FLAC),
    "audio_seconds"}."""
    flac = encode_flac(wave)
    stored = decode_flac(flac)  # what readers will see: the 16-bit waveform
    picture = spectrogram_jpeg(log_mel_fbank(stored * 32768.0))
    return {"image": picture, "audio": flac, "audio_seconds": stored.numel() / SAMPLE_RATE}


def load_audio_columns(path: Union[str, os.PathLike], max_seconds: float = 0.0) -> tuple[Optional[dict[str, Any]], str]:
    """({"image", "audio", "audio_seconds"}, "ok") of an audio (or video) file, or (None, reason)."""
    wave, reason = decode_audio_file(path, max_seconds)
    return (None, reason) if wave is None else (audio_columns(wave), "ok")


AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus", ".mp4", ".mkv", ".webm")


def read_audio_captions(audio_dir: str, csv_path: str, stats, *, dataset: str = "", per_clip: bool = False,
                        max_seconds: float = 0.0):
    """AudioJobs of AudioCaps / Clotho style caption CSVs, recognised by their header:
        AudioCaps: audiocap_id, youtube_id, start_time, caption  (one caption per line; a clip may repeat)
        Clotho:    file_name, caption_1, ..., caption_5
    The audio file is found under `audio_dir` (recursively) by its stem: Clotho's file_name; for AudioCaps the
    youtube_id, "Y" + youtube_id (AudioSet downloads) or the audiocap_id. Rows: task caption, one per caption
    with the clip's captions as references (per_clip: one per clip); image_id numbers the clips."""
    from collections import defaultdict

    from blip_train.data.convert import AudioJob, InputError, clean_text, files_by_stem, read_csv_file, require_dir

    root = require_dir(audio_dir, "audio")
    path = Path(csv_path)
    records = read_csv_file(path, dict_rows=True)
    header = set(records[0]) if records else set()
    if {"youtube_id", "caption"} <= header:
        kind, name = "audiocaps", dataset or "audiocaps"
    elif "file_name" in header and any(k.startswith("caption_") for k in header):
        kind, name = "clotho", dataset or "clotho"
    else:
        raise InputError(f"{path}: expected an AudioCaps header (audiocap_id,youtube_id,start_time,caption) or a "
                         f"Clotho one (file_name,caption_1..caption_5); found {sorted(header) or 'no rows'}")
    files = files_by_stem(root, AUDIO_EXTS)
    captions: dict[str, list[str]] = defaultdict(list)
    for rec in records:
        if kind == "audiocaps":
            ids = [str(rec.get("youtube_id") or ""), "Y" + str(rec.get("youtube_id") or ""),
                   str(rec.get("audiocap_id") or "")]
            stem = next((s for s in ids if s in files), ids[0])
            texts = [rec.get("caption")]
        else:
            stem = Path(str(rec.get("file_name") or "")).stem
            texts = [v for k, v in sorted(rec.items()) if k and k.startswith("caption_")]
        if not stem:
            stats.skip("malformed_record", len(texts))
            continue
        for text in texts:
            caption, reason = clean_text(text)
            if caption is None:
                stats.skip(reason)
            else:
                captions[stem].append(caption)
    for image_id, (stem, refs) in enumerate(captions.items()):
        base = {"captions": refs, "task": "caption", "dataset": name, "source": name, "image_id": image_id}
        rows = [{**base, "caption": refs[0]}] if per_clip else [{**base, "caption": c} for c in refs]
        yield AudioJob(files.get(stem, str(root / f"{stem}.wav")), rows, max_seconds=max_seconds)
