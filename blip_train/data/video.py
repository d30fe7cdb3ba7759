"""Video samples in the MDS schema: a few frames sampled at conversion, stored as JPEGs with their times.

Why frames and not the encoded clip: reading InstructBLIP's 4 frames from a stored H.264 clip means seeking to
keyframes and decoding forward: 211 ms per 10-s 640x360 clip on one core against 3.5 ms for its 4 stored JPEGs
(60x), which also take half the bytes (193 against 416 KB; bench/video.py, bench/RESULTS.md). At several hundred
samples/s per GPU the encoded clip would need tens of decoding cores per GPU. The price is fixing the number and
placement of frames at conversion (convert again to change them).

A video split is a split of the one schema (data/schema.py) with extra columns (VIDEO_COLUMNS):
    image        the first sampled frame (JPEG), so image readers and inspection tools work unchanged
    frames       the other sampled frames' JPEGs, concatenated
    frame_sizes  their byte lengths, in order (json list)
    frame_times  every sampled frame's time in the clip, seconds, the first frame's included (json list)
`clip_frames(row)` gives a row's frames in order, the first one included.

Sampling (`sample_times`): the middle of each of n equal segments of the clip, InstructBLIP's uniform sampling
for video QA. Frames are decoded with PyAV (FFmpeg), seeking to each time and decoding forward to it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

VIDEO_COLUMNS: dict[str, str] = {"frames": "bytes", "frame_sizes": "json", "frame_times": "json"}
"""Extra MDS columns of a video split (write_split(extra_columns=...))."""

NOT_A_VIDEO = "not_a_video"
TOO_FEW_FRAMES = "too_few_frames"
MISSING_VIDEO = "missing_video"
EMPTY_VIDEO = "empty_video"
CORRUPT_VIDEO = "corrupt_video"


def sample_times(duration: float, n: int) -> list[float]:
    """The middle of each of `n` equal segments of [0, duration): InstructBLIP's uniform frame sampling."""
    if n < 1:
        raise ValueError(f"frames: {n}; at least one frame is sampled")
    return [duration * (i + 0.5) / n for i in range(n)]


def clip_frames(row: dict[str, Any]) -> list[bytes]:
    """A video row's frames as JPEG bytes, in time order (`image` first). A row of an image split is one frame."""
    frames, out, at = row.get("frames") or b"", [row["image"]], 0
    for size in row.get("frame_sizes") or []:
        out.append(frames[at:at + size])
        at += size
    if at != len(frames):
        raise ValueError(f"frame_sizes add up to {at} bytes, frames holds {len(frames)}")
    return out


def load_video_frames(path: Union[str, os.PathLike], n: int, resize_short_side: int = 0,
                      resize_max_side: int = 0) -> tuple[Optional[dict[str, Any]], str]:
    """({"image", "frames", "frame_sizes", "frame_times"}, "ok") of a video file's `n` uniformly sampled frames,
    each downscaled as images are (`images.resize_scale`) and stored as JPEG; or (None, reason) for a missing,
    empty, corrupt or non-video file, or one with fewer than `n` decodable frames. Never raises on bad input."""
    import av

    from blip_train.data.images import encode_jpeg, resize_scale

    p = Path(path)
    if not p.is_file():
        return None, MISSING_VIDEO
    if p.stat().st_size == 0:
        return None, EMPTY_VIDEO
    try:
        images, times = _decode_at_samples(p, n)
    except (av.FFmpegError, OSError, ValueError, IndexError):
        return None, CORRUPT_VIDEO
    if images is None:
        return None, NOT_A_VIDEO
    if len(images) < n or len(set(times)) < n:  # a clip shorter than n frames gives one frame at several times
        return None, TOO_FEW_FRAMES
    blobs = []
    for im in images:
        scale = resize_scale(im.width, im.height, resize_short_side, resize_max_side)
        if scale < 1:
            from PIL import Image

            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        blobs.append(encode_jpeg(im))
    return {"image": blobs[0], "frames": b"".join(blobs[1:]), "frame_sizes": [len(b) for b in blobs[1:]],
            "frame_times": [round(t, 3) for t in times]}, "ok"


def _decode_at_samples(path: Path, n: int):
    """(PIL RGB frames at the sample times, their times), or (None, []) without a video stream. A clip whose
    duration the container does not state is decoded whole first to count its frames."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            return None, []
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # converters run one process per core
        duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
        if duration <= 0 and container.duration:
            duration = container.duration / 1e6
        if duration <= 0:  # no stated duration: the frames' own times
            frames = [(f.time or 0.0, f.to_image()) for f in container.decode(stream)]
            if len(frames) < n:
                return [im for _, im in frames], []
            picks = [frames[int(len(frames) * (i + 0.5) / n)] for i in range(n)]
            return [im for _, im in picks], [t for t, _ in picks]
        images, times = [], []
        for t in sample_times(duration, n):
            container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
            last = None
            for frame in container.decode(stream):
                last = frame
                if frame.time is not None and frame.time >= t - 1e-6:
                    break
            if last is None:
                break  # nothing decodes from here on: too few frames
            images.append(last.to_image())
            times.append(float(last.time if last.time is not None else t))
        return images, times


VIDEO_EXTS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


def read_video_qa(videos_dir: str, qa_json: str, stats, *, frames: int = 4, mapping: Optional[str] = None,
                  dataset: str = "video_qa"):
    """VideoJobs of MSRVTT-QA / MSVD-QA style annotations: a JSON (or JSON-lines) list of {question, answer,
    video_id | video, id}. The video file is found under `videos_dir` (recursively) by its stem: `video` when
    given, else `video<video_id>` (MSRVTT's names), or through `mapping` (MSVD-QA's youtube_mapping.txt lines
    "<youtube stem> vid<N>", N = video_id). Rows: task vqa, answers [answer]; image_id numbers the videos."""
    from collections import defaultdict

    from blip_train.data.convert import (EMPTY_TEXT, InputError, VideoJob, clean_text, files_by_stem, load_json,
                                         require_dir)

    root = require_dir(videos_dir, "videos")
    data = load_json(qa_json)
    if not isinstance(data, list):
        raise InputError(f"{qa_json}: expected a list of {{question, answer, video_id | video, id}} records")
    stems: dict[str, str] = {}
    if mapping:
        for line in Path(mapping).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                stems[parts[1]] = parts[0]
    files = files_by_stem(root, VIDEO_EXTS)
    by_video: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for n, rec in enumerate(data):
        if not isinstance(rec, dict) or ("video" not in rec and "video_id" not in rec):
            stats.skip("malformed_record")
            continue
        question, r1 = clean_text(rec.get("question"))
        answer, r2 = clean_text(rec.get("answer"))
        if question is None or answer is None:
            stats.skip(r1 if question is None else (r2 if answer is None else EMPTY_TEXT))
            continue
        name = str(rec["video"]) if "video" in rec else f"video{rec['video_id']}"
        if mapping and "video_id" in rec:
            name = stems.get(f"vid{rec['video_id']}", name)
        qid = rec.get("id", rec.get("question_id", n))
        by_video[Path(name).stem].append({"question": question, "answer": answer, "answers": [answer],
                                          "task": "vqa", "dataset": dataset, "source": dataset,
                                          "question_id": int(qid) if str(qid).isdigit() else n})
    for image_id, (stem, rows) in enumerate(by_video.items()):
        for row in rows:
            row["image_id"] = image_id
        yield VideoJob(files.get(stem, str(root / f"{stem}.mp4")), rows, frames=frames)
