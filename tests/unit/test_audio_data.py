"""Audio data: Kaldi's log-mel filterbank (BEATs' and AST's features) against transformers' reference implementation,
X-InstructBLIP's segments, and the AudioCaps / Clotho converter (tools/convert_audio_captions.py) on files the test
writes: resampled to 16 kHz mono FLAC, the spectrogram as the row's picture; missing, empty, corrupt, silent, short
and audio-less files skipped and counted."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from blip_train.data.audio import (SAMPLE_RATE, decode_flac, fbank_segments, kaldi_mel_banks, log_mel_fbank,
                                   read_audio_captions)
from blip_train.data.convert import AudioJob, ConvertStats
from tests.conftest import REPO, clean_env
from tests.unit.test_video_data import write_clip

TOOL = REPO / "tools" / "convert_audio_captions.py"


def tone(freq: float, seconds: float, rate: int, channels: int = 1, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = amplitude * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels, axis=1).astype(np.float32)


def write_wav(path, wave: np.ndarray, rate: int) -> None:
    import soundfile

    soundfile.write(str(path), wave, rate, subtype="PCM_16")


def peak_hz(wave: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(spectrum.argmax()) * SAMPLE_RATE / wave.numel()


@pytest.mark.parametrize("window, hf_window", [("povey", "povey"), ("hanning", "hann")])
def test_fbank_matches_transformers_kaldi_implementation(window, hf_window):
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    rng = np.random.default_rng(0)
    wave = (tone(440, 1.5, SAMPLE_RATE)[:, 0] + 0.05 * rng.standard_normal(int(1.5 * SAMPLE_RATE))) * 32768
    mel = mel_filter_bank(num_frequency_bins=257, num_mel_filters=128, min_frequency=20, max_frequency=8000,
                          sampling_rate=SAMPLE_RATE, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    ref = spectrogram(wave.astype(np.float32), window_function(400, hf_window, periodic=False), frame_length=400,
                      hop_length=160, fft_length=512, power=2.0, center=False, preemphasis=0.97, mel_filters=mel,
                      log_mel="log", mel_floor=float(np.finfo(np.float32).eps), remove_dc_offset=True).T
    ours = log_mel_fbank(torch.from_numpy(wave.astype(np.float32)), window=window)
    assert ours.shape == ref.shape == (148, 128)  # 1 + (24000 - 400) // 160 frames, no padding
    np.testing.assert_allclose(kaldi_mel_banks().numpy(), mel, atol=1e-5)
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-3)


def test_segments_cut_in_order_and_pad_with_zeros():
    fbank = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)
    seg = fbank_segments(fbank, 2, 4)
    assert seg.shape == (2, 4, 3)
    assert torch.equal(seg.reshape(8, 3)[:7], fbank) and not seg[1, 3].any()
    assert torch.equal(fbank_segments(fbank, 1, 5)[0], fbank[:5])


def test_converter_resamples_stores_and_counts_what_it_skips(tmp_path):
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    write_wav(audio / "Ytone440.wav", tone(440, 2.0, 44100, channels=2), 44100)  # stereo 44.1 kHz
    write_wav(audio / "sub" / "tone1000.wav", tone(1000, 1.0, 8000), 8000)
    write_wav(audio / "silence.wav", np.zeros((16000, 1), np.float32), 16000)
    write_wav(audio / "short.wav", tone(440, 0.01, 16000), 16000)
    (audio / "empty.wav").write_bytes(b"")
    (audio / "corrupt.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    write_clip(audio / "mute.mp4", 5)  # a video without an audio track
    rows = [("1", "tone440", "a high beep"), ("2", "tone440", "a steady tone"), ("3", "tone1000", "a whistle"),
            ("4", "silence", "nothing"), ("5", "short", "a click"), ("6", "empty", "x"), ("7", "corrupt", "x"),
            ("8", "mute", "x"), ("9", "gone", "x"), ("10", "tone1000", "   ")]
    csv = tmp_path / "audiocaps.csv"
    csv.write_text("audiocap_id,youtube_id,start_time,caption\n" + "".join(f"{a},{y},0,{c}\n" for a, y, c in rows))
    r = subprocess.run([sys.executable, str(TOOL), "--audio", str(audio), "--captions", str(csv), "--out",
                        str(tmp_path / "split"), "--workers", "2"], env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["written"] == 3 and stats["images"] == 2
    assert stats["skipped"] == {"silent_audio": 1, "too_short_audio": 1, "empty_audio": 1, "corrupt_audio": 1,
                                "not_audio": 1, "missing_audio": 1, "empty_text": 1}, stats["skipped"]
    assert "wrote 3 samples (2 clips)" in r.stdout

    from streaming import LocalDataset

    ds = LocalDataset(str(tmp_path / "split"))
    got = [ds[i] for i in range(len(ds))]
    assert [g["caption"] for g in got] == ["a high beep", "a steady tone", "a whistle"]
    assert got[0]["captions"] == ["a high beep", "a steady tone"] and got[0]["image_id"] == got[1]["image_id"]
    assert {g["dataset"] for g in got} == {"audiocaps"} and {g["task"] for g in got} == {"caption"}
    for g, hz, seconds in ((got[0], 440, 2.0), (got[2], 1000, 1.0)):
        wave = decode_flac(g["audio"])
        assert abs(wave.numel() - seconds * SAMPLE_RATE) <= 32 and g["audio_seconds"] == wave.numel() / SAMPLE_RATE
        assert abs(peak_hz(wave) - hz) < 2 and 0.25 < float(wave.abs().max()) < 0.35
        picture = Image.open(io.BytesIO(g["image"]))
        assert picture.format == "JPEG" and picture.height == 128 and picture.width == log_mel_fbank(wave).shape[0]


def test_clotho_layout_per_clip_and_a_time_limit(tmp_path):
    write_wav(tmp_path / "a.wav", tone(300, 3.0, 16000), 16000)
    csv = tmp_path / "clotho.csv"
    csv.write_text("file_name,caption_1,caption_2,caption_3\na.wav,one,two,three\n")
    stats = ConvertStats()
    jobs = list(read_audio_captions(str(tmp_path), str(csv), stats, per_clip=True, max_seconds=1.5))
    assert len(jobs) == 1 and isinstance(jobs[0], AudioJob) and jobs[0].max_seconds == 1.5
    assert [r["caption"] for r in jobs[0].rows] == ["one"] and jobs[0].rows[0]["captions"] == ["one", "two", "three"]
    assert jobs[0].rows[0]["dataset"] == "clotho"
    from blip_train.data.audio import load_audio_columns

    columns, reason = load_audio_columns(jobs[0].source, jobs[0].max_seconds)
    assert reason == "ok" and columns["audio_seconds"] == 1.5


def test_an_unknown_captions_file_is_one_line(tmp_path):
    (tmp_path / "x.csv").write_text("path,text\na.wav,hello\n")
    r = subprocess.run([sys.executable, str(TOOL), "--audio", str(tmp_path), "--captions", str(tmp_path / "x.csv"),
                        "--out", str(tmp_path / "split")], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "expected an AudioCaps header" in r.stderr and not (tmp_path / "split").exists()


def _heard(wave: torch.Tensor) -> tuple[str, str, float]:
    """(pitch band, pattern, level) read off a clip's spectrum, without its caption."""
    from blip_train.data.synthetic_audio import PITCHES

    frames = wave.unfold(0, 800, 400)  # 50-ms frames
    spectra = torch.fft.rfft(frames * torch.hann_window(800), n=2048).abs()
    level = frames.pow(2).mean(1).sqrt()
    on = level > 0.3 * level.max()
    peaks = spectra.argmax(1).float() * SAMPLE_RATE / 2048
    middle = float(peaks[on].median())
    pitch = min(PITCHES, key=lambda k: abs(np.log2(middle / PITCHES[k])))
    drift = float(np.log2(peaks[on][-5:].median() / peaks[on][:5].median()))
    if int((on[1:] != on[:-1]).sum()) > 8:
        pattern = "beeping"
    else:
        pattern = "rising" if drift > 0.5 else "falling" if drift < -0.5 else "steady"
    return pitch, pattern, float(level[on].mean())


def test_synthetic_tones_sound_like_their_captions(tmp_path):
    from blip_train.data.synthetic_audio import describe, make_clip, write_synthetic_audio_dataset

    levels = {"quiet": [], "loud": []}
    for i in range(40):
        row = make_clip(i, seed=3)
        pitch, pattern, level = _heard(decode_flac(row["audio"]))
        loudness = row["caption"].split()[1]
        assert row["caption"] == describe(pitch, pattern, loudness), (i, row["caption"], pitch, pattern)
        levels[loudness].append(level)
    assert max(levels["quiet"]) < min(levels["loud"]) / 3
    assert make_clip(7, seed=3) == make_clip(7, seed=3) and make_clip(7, seed=3) != make_clip(7, seed=4)
    summary = write_synthetic_audio_dataset(tmp_path / "tones", 10, seconds=1.0)
    assert (summary["train"], summary["val"]) == (8, 2)
    r = subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic_dataset.py"), "--audio", "--audio-seconds",
                        "1", "--num-samples", "10", "--out", str(tmp_path / "cli")], env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]) == {**summary,
                                                                                "out": str(tmp_path / "cli")}
    index = [(tmp_path / d / "train" / "index.json").read_text() for d in ("cli", "tones")]
    assert index[0] == index[1]  # the same bytes
    from streaming import LocalDataset

    row = LocalDataset(str(tmp_path / "tones" / "val"))[0]
    assert row["audio_seconds"] == 1.0 and row["dataset"] == "synthetic_tones" and row["task"] == "caption"
