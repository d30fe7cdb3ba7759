"""The data bench's plumbing on a tiny input (the measurement itself is `make bench`, not a test)."""
from __future__ import annotations

import io
import json

from PIL import Image


def test_data_bench_prints_the_three_pipelines_per_split_and_a_json_line(capsys):
    from bench.data import SPLITS, build_images, run_data_bench

    images = build_images(3)
    sizes = {k: [Image.open(io.BytesIO(b)).size for b in v] for k, v in images.items()}
    assert all(s in ((640, 480), (480, 640)) for s in sizes["coco"])
    assert all(1024 <= max(s) <= 2048 for s in sizes["web"])
    assert all(min(s) == 512 for s in sizes["web_resized"])
    out = run_data_bench(images_per_split=4, reps=1, batch_size=2, repeat=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out
    header = next(line for line in lines if line.startswith("| split"))
    assert "(a) decode PIL" in header and "(b) LAVIS" in header and "(c) ours" in header
    # two tables, one row per split in each: wall-clock figures, then the ratios in CPU time
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "split" not in line] == \
        list(SPLITS) * 2
    for split in SPLITS:
        for ratios in (out["ratios"][split], out["ratios_cpu_time"][split]):
            assert set(ratios) == {"ours_vs_lavis", "ours_vs_decode_pil", "ours_vs_decode_turbo"}
            assert all(v > 0 for v in ratios.values())
        assert set(out["images_per_s_per_core"][split]) == {"decode_pil", "decode_turbo", "lavis", "ours",
                                                             "ours_gpu_decode_worker"}
    assert out["grey_levels_vs_reference"]["coco"] < 1.0
