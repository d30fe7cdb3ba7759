"""tools/plot_run.py: a run's metrics.jsonl as a PNG of its curves."""
from __future__ import annotations

import json

from PIL import Image

from blip_train.training.plots import read_history
from tests.unit.test_tools_convert import run


def write_history(path, steps=20):
    rows = [{"step": s, "train/loss": 9.0 / s, "train/loss_itc": 3.0 / s, "train/lr": 1e-4 * min(1, s / 5),
             "perf/samples_per_s": 30.0, "perf/samples_per_s_per_rank": 15.0} for s in range(1, steps + 1)]
    rows += [{"step": s, "eval/img_r1": 2.0 * s, "eval/txt_r1": 1.5 * s} for s in (10, 20)]
    rows.append({"step": 20, "train/loss": 0.25})  # a resumed run logged step 20 again: the later line wins
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 21, "train/lo')  # cut off by a kill


def test_history_keeps_the_last_value_per_step_and_skips_a_cut_off_line(tmp_path):
    write_history(tmp_path / "metrics.jsonl")
    h = read_history(tmp_path / "metrics.jsonl")
    assert h["train/loss"][-1] == (20, 0.25) and len(h["train/loss"]) == 20
    assert h["eval/img_r1"] == [(10, 20.0), (20, 40.0)]


def test_plot_run_writes_a_png_with_every_panel(tmp_path, capsys):
    write_history(tmp_path / "metrics.jsonl")
    code, out, err = run("plot_run.py", "--run", str(tmp_path), capsys=capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["panels"] == ["losses", "learning rate", "held-out evaluation", "throughput (samples/s)"]
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.height > im.width / 2
        assert len(set(im.convert("L").getdata())) > 10  # lines drawn, not a blank canvas
    code, _, err = run("plot_run.py", "--run", str(tmp_path), capsys=capsys)
    assert code == 2 and "exists; pass --overwrite" in err
    code, _, err = run("plot_run.py", "--run", str(tmp_path / "nope"), capsys=capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such file "
                                                      "(a run writes metrics.jsonl as it logs)"]
