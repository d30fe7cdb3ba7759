"""Video QA conversion (tools/convert_video_qa.py): frames sampled uniformly with PyAV and stored as JPEGs with
their times, on videos the test encodes; missing, empty, corrupt, audio-only and too-short files skipped and
counted."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blip_train.data.video import TOO_FEW_FRAMES, clip_frames, load_video_frames, sample_times
from tests.conftest import REPO, clean_env


def write_clip(path, frames: int, fps: int = 10, size=(64, 48)) -> None:
    """A white square moving left to right over black, H.264."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            a = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            x = int((size[0] - 12) * i / max(frames - 1, 1))
            a[18:30, x:x + 12] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_audio_only(path) -> None:
    import av

    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def square_x(jpeg: bytes) -> float:
    """Mean column of the bright pixels: where the square is."""
    a = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))
    return float(np.nonzero(a > 128)[1].mean())


def test_uniform_sampling_is_the_middle_of_equal_segments():
    assert sample_times(8.0, 4) == [1.0, 3.0, 5.0, 7.0]
    with pytest.raises(ValueError):
        sample_times(8.0, 0)


def test_frames_are_sampled_in_time_order_and_stored_as_jpegs(tmp_path):
    write_clip(tmp_path / "clip.mp4", frames=40)
    cols, reason = load_video_frames(tmp_path / "clip.mp4", 4)
    assert reason == "ok" and len(cols["frame_sizes"]) == 3 and len(cols["frame_times"]) == 4
    times = cols["frame_times"]
    assert times == sorted(times) and abs(times[0] - 0.5) <= 0.1 and abs(times[-1] - 3.5) <= 0.1
    frames = clip_frames(cols)
    assert len(frames) == 4 and all(f[:2] == b"\xff\xd8" for f in frames)
    xs = [square_x(f) for f in frames]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 20  # the square moved right
    write_clip(tmp_path / "short.mp4", frames=2)
    assert load_video_frames(tmp_path / "short.mp4", 4) == (None, TOO_FEW_FRAMES)


def test_converter_writes_a_video_split_and_counts_what_it_skips(tmp_path):
    from streaming import StreamingDataset

    from blip_train.data.schema import verify_split

    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    write_clip(videos / "video0.mp4", frames=30)
    write_clip(videos / "sub" / "video1.mp4", frames=30)
    write_clip(videos / "video2.mp4", frames=2)  # too short for 4 frames
    (videos / "video3.mp4").write_bytes(b"")
    (videos / "video4.mp4").write_bytes(b"\x00\x01garbage" * 100)
    write_audio_only(videos / "video5.mkv")
    qa = [{"question": "where does the square go?", "answer": "right", "video_id": 0, "id": 10},
          {"question": "what moves?", "answer": "square", "video_id": 0, "id": 11},
          {"question": "what moves?", "answer": "square", "video_id": 1, "id": 12},
          *({"question": "q", "answer": "a", "video_id": v, "id": 20 + v} for v in (2, 3, 4, 5, 6)),
          {"question": "", "answer": "a", "video_id": 0, "id": 30}, {"bogus": 1}]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_video_qa.py"), "--videos", str(videos), "--qa",
                        str(tmp_path / "qa.json"), "--out", str(tmp_path / "mds"), "--workers", "1"],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["written"] == 3 and summary["images"] == 2
    assert summary["skipped"] == {"too_few_frames": 1, "empty_video": 1, "corrupt_video": 1, "not_a_video": 1,
                                  "missing_video": 1, "empty_text": 1, "malformed_record": 1}
    assert verify_split(str(tmp_path / "mds")) == 3
    ds = StreamingDataset(local=str(tmp_path / "mds"), shuffle=False, batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    assert [row["question_id"] for row in rows] == [10, 11, 12] and rows[0]["image_id"] == rows[1]["image_id"] != \
        rows[2]["image_id"]
    assert all(len(clip_frames(row)) == 4 and len(row["frame_times"]) == 4 for row in rows)
    assert rows[0]["task"] == "vqa" and rows[0]["answers"] == ["right"]


def test_synthetic_motion_clips_need_more_than_one_frame():
    """The mover's centroid moves monotonically along its direction; its size and where it is in one frame do not
    give the answer away (sizes drawn alike for both shapes; paths centred on random points)."""
    from collections import Counter

    from blip_train.data.synthetic_video import DIRECTIONS, make_clip

    rows = [make_clip(i, 0, 4, 64) for i in range(240)]
    way = [r for r in rows if r["question"].startswith("which way")]
    assert Counter(r["answer"] for r in way).keys() == DIRECTIONS.keys()
    assert max(Counter(r["answer"] for r in rows).values()) / len(rows) < 0.2  # no dominant answer
    for r in way[:10]:
        frames = [np.asarray(Image.open(io.BytesIO(f)).convert("HSV"))[..., 1] for f in clip_frames(r)]
        cx = [float(np.nonzero(s > 120)[1].mean()) for s in frames]  # saturated pixels: the shapes
        cy = [float(np.nonzero(s > 120)[0].mean()) for s in frames]
        dx, dy = DIRECTIONS[r["answer"]]
        moved = [c1 - c0 for c0, c1 in zip(cx if dx else cy, (cx if dx else cy)[1:])]
        assert all(m * (dx or dy) > 0 for m in moved), (r["answer"], cx, cy)
    # Where the shape is over the clip says nothing of the direction (paths centred at random): the order does.
    def mean_x(r) -> float:
        return float(np.mean([np.nonzero(np.asarray(Image.open(io.BytesIO(f)).convert("HSV"))[..., 1] > 120)[1].mean()
                              for f in clip_frames(r)]))
    centre = {d: np.mean([mean_x(r) for r in way if r["answer"] == d]) for d in ("left", "right")}
    assert abs(centre["left"] - centre["right"]) < 4
