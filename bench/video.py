"""How a video sample should be stored: frames sampled at conversion as JPEGs, or the encoded clip decoded at
read time. One run, side by side, per clip and per core.

    python bench/video.py [--clips 6] [--seconds 10] [--frames 4]

Clips: `--seconds` of 640 x 360 at 30 fps, H.264 (libx264, its default keyframe interval of 250 frames, as
web video), panning and zooming over real photographs (scikit-image's sample images), so the encoder sees
photographic detail and motion. Measured, with 1 thread, for InstructBLIP's sampling of `--frames` frames
spread uniformly over the clip:
  (a) clip_seek    read time from the encoded clip: seek to each sample time (back to the keyframe before it)
                   and decode forward to it, as a reader of encoded clips must;
  (b) clip_all     the whole clip decoded, the sampled frames kept (what a reader without seeking does);
  (c) jpeg_frames  the sampled frames stored at conversion (shorter side 360, quality 90) decoded.
Bytes per sample are reported for each storage. The last line is JSON with the ratios.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [np.asarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]


def make_clip(path: Path, photo: np.ndarray, seconds: float, fps: int = 30, size=(640, 360)) -> None:
    """A pan-and-zoom over `photo`, H.264 in MP4."""
    import av
    from PIL import Image

    img = Image.fromarray(photo[..., :3] if photo.ndim == 3 else np.stack([photo] * 3, -1))
    w, h = img.size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        n = int(seconds * fps)
        for i in range(n):
            t = i / max(n - 1, 1)
            zoom = 0.6 + 0.3 * t
            cw, ch = int(w * zoom), int(h * zoom)
            x, y = int((w - cw) * t), int((h - ch) * (1 - t))
            frame = img.crop((x, y, x + cw, y + ch)).resize(size)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def sample_times(duration: float, frames: int) -> list[float]:
    """InstructBLIP's uniform sampling: the middle of each of `frames` equal segments."""
    return [duration * (i + 0.5) / frames for i in range(frames)]


def decode_seek(path: Path, frames: int) -> list[np.ndarray]:
    import av

    out = []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1  # one core, as the other readings
        duration = float(s.duration * s.time_base)
        for t in sample_times(duration, frames):
            c.seek(int(t / s.time_base), stream=s, backward=True, any_frame=False)
            for f in c.decode(s):
                if f.time >= t - 1e-6:
                    out.append(f.to_ndarray(format="rgb24"))
                    break
    return out


def decode_all(path: Path, frames: int) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        duration = float(s.duration * s.time_base)
        wanted, out = sample_times(duration, frames), []
        for f in c.decode(s):
            if wanted and f.time >= wanted[0] - 1e-6:
                out.append(f.to_ndarray(format="rgb24"))
                wanted.pop(0)
    return out


def to_jpegs(images: list[np.ndarray], short: int = 360, quality: int = 90) -> list[bytes]:
    from PIL import Image

    out = []
    for a in images:
        img = Image.fromarray(a)
        scale = short / min(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode_jpegs(blobs: list[bytes]) -> list[np.ndarray]:
    import simplejpeg

    return [simplejpeg.decode_jpeg(b, colorspace="RGB") for b in blobs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    photos = _photos()
    with tempfile.TemporaryDirectory() as tmp:
        clips = [Path(tmp) / f"clip{i}.mp4" for i in range(args.clips)]
        for i, path in enumerate(clips):
            make_clip(path, photos[i % len(photos)], args.seconds)
        stored = [to_jpegs(decode_seek(c, args.frames)) for c in clips]
        ms: dict[str, list[float]] = {"clip_seek": [], "clip_all": [], "jpeg_frames": []}
        for _ in range(args.repeats):
            for name, run in (("clip_seek", lambda i: decode_seek(clips[i], args.frames)),
                              ("clip_all", lambda i: decode_all(clips[i], args.frames)),
                              ("jpeg_frames", lambda i: decode_jpegs(stored[i]))):
                t0 = time.perf_counter()
                for i in range(len(clips)):
                    assert len(run(i)) == args.frames
                ms[name].append(1000 * (time.perf_counter() - t0) / len(clips))
        sizes = {"clip": statistics.mean(c.stat().st_size for c in clips),
                 "jpeg_frames": statistics.mean(sum(map(len, s)) for s in stored)}
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"{args.clips} clips of {args.seconds:.0f} s, 640x360 H.264, {args.frames} frames per sample, 1 thread")
    print(f"{'storage / read':<14}{'ms/sample':>10}{'samples/s/core':>16}{'KB/sample':>11}")
    for k in ms:
        kb = sizes["clip" if k.startswith("clip") else "jpeg_frames"] / 1000
        print(f"{k:<14}{med[k]:>10.1f}{1000 / med[k]:>16.1f}{kb:>11.0f}")
    print(json.dumps({"bench": "video", "ms_per_sample": med, "kb_per_sample": {k: v / 1000 for k, v in sizes.items()},
                      "seek_over_jpeg": med["clip_seek"] / med["jpeg_frames"],
                      "all_over_jpeg": med["clip_all"] / med["jpeg_frames"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
