"""CapFilt on a tiny random stage-1 model: selection rules, report, output schema, determinism, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blip_train.capfilt import (EXTRA_COLUMNS, REPORT_FILE, Candidate, Captioner, CapFiltSettings, CapFiltStats,
                                Histogram, build_report, decode_captions, eval_pixels_at_sizes, format_report,
                                output_row, process_chunk, run_capfilt, select_captions)
from blip_train.capfilt import runner
from blip_train.data.schema import COLUMNS, SCHEMA_FILE, verify_split, write_split
from blip_train.data.synthetic import write_synthetic_dataset
from blip_train.data.tokenizers import load_qformer_tokenizer
from blip_train.models.stage1 import Blip2Stage1
from tests.helpers.tiny import tiny_model_config, tiny_qformer_config, tiny_vision_config

MAX_TXT_LEN = 16


def read_rows(split: Path) -> list[dict]:
    from streaming import LocalDataset
    ds = LocalDataset(str(split))
    return [dict(ds[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_assets):
    tokenizer = load_qformer_tokenizer(tiny_assets / "qformer_tokenizer")
    cfg = tiny_model_config(max_txt_len=MAX_TXT_LEN, qformer=tiny_qformer_config(vocab_size=256))
    torch.manual_seed(0)
    return Blip2Stage1(cfg, device_type="cpu").eval(), tokenizer


@pytest.fixture(scope="module")
def noisy_split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("capfilt_data")
    write_synthetic_dataset(root, num_samples=20, seed=3, noise_fraction=0.3, val_fraction=0.0, image_size=32)
    return root / "train"


def settings(**kw) -> CapFiltSettings:
    base = dict(image_size=32, max_txt_len=MAX_TXT_LEN, num_captions=3, keep_top=2, itm_threshold=0.5,
                max_len=6, chunk_size=6, batch_size=4)
    return CapFiltSettings(**{**base, **kw})


# ------------------------------------------------------------------------------------ pure pieces

def test_select_keeps_passing_web_and_top_itc_synthetic_that_pass_itm() -> None:
    web = Candidate("web", "web", itm=0.7, itc=0.1)
    syn = [Candidate("a", "synthetic", itm=0.9, itc=0.2), Candidate("b", "synthetic", itm=0.2, itc=0.9),
           Candidate("c", "synthetic", itm=0.8, itc=0.5), Candidate("d", "synthetic", itm=0.9, itc=0.5)]
    kept, top = select_captions(web, syn, keep_top=2, itm_threshold=0.5)
    assert [c.text for c in top] == ["b", "c"]  # by ITC; c before d on a tie (sampling order)
    assert [c.text for c in kept] == ["web", "c"]  # b fails ITM: not replaced by the next one
    kept, _ = select_captions(Candidate("w", "web", itm=0.4, itc=0.9), syn, keep_top=0, itm_threshold=0.5)
    assert kept == []
    kept, _ = select_captions(web, syn, keep_top=3, itm_threshold=0.5, itc_threshold=0.3)
    assert [c.text for c in kept] == ["c", "d"]  # the web caption fails the ITC filter


def test_settings_refuse_bad_values() -> None:
    for bad in (dict(itm_threshold=1.5), dict(top_p=0.0), dict(sampling="beam"), dict(num_captions=-1),
                dict(itc_threshold=2.0), dict(max_len=1), dict(chunk_size=0)):
        with pytest.raises(ValueError, match="capfilt:"):
            settings(**bad)


def test_histogram_bins_merge_and_report() -> None:
    h = Histogram(0.0, 1.0, 10)
    h.add([0.0, 0.3, 0.95, 1.0, 1.7, -0.2, float("nan")])
    assert h.counts == [2, 0, 0, 1, 0, 0, 0, 0, 0, 3]  # ends clamp, NaN skipped
    stats, other = CapFiltStats(), CapFiltStats()
    stats.counts.update(images=10, web_kept=6, web_dropped=4, noisy_web=4, noisy_web_dropped=3, clean_web=6,
                        clean_web_kept=5, synthetic_kept=7, rows=13)
    other.histograms["itm_web_clean"].add([0.55])
    stats.merge_(CapFiltStats.from_json(json.loads(json.dumps(other.to_json()))))
    report = build_report(stats, {"settings": {}})
    assert report["noise"]["noisy_drop_rate"] == 0.75 and report["noise"]["clean_keep_rate"] == 0.8333
    assert report["web"] == {"kept": 6, "dropped": 4, "no_caption": 0, "kept_rate": 0.6}
    assert report["histograms"]["itm_web_clean"]["counts"][5] == 1
    text = format_report(report)
    assert "noisy web dropped           3/4 (75.0%)" in text and "clean web kept              5/6 (83.3%)" in text
    assert "noise" not in build_report(CapFiltStats(), {})  # no noisy flags in the input: no rates


def test_decode_captions_cuts_at_sep(model_and_tokenizer) -> None:
    _, tok = model_and_tokenizer
    words = tok("a red circle", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id, *words, tok.sep_token_id, tok.pad_token_id],
                        [tok.bos_token_id, *words, words[0], words[0]]])
    assert decode_captions(tok, ids) == ["a red circle", "a red circle a a"]


def test_output_row_holds_an_images_kept_captions_together() -> None:
    row = {"image": b"x", "caption": "web text", "answer": "web text", "answers": ["web text"], "task": "caption",
           "noisy": 1, "source": "laion", "question": "q?", "image_id": 4}
    kept = [Candidate("web text", "web", 0.9, 0.4), Candidate("new text", "synthetic", itm=0.75, itc=0.25)]
    out = output_row(row, 17, kept)
    assert out["caption"] == out["answer"] == "web text" and out["captions"] == out["answers"] == ["web text", "new text"]
    assert (out["source"], out["noisy"], out["orig_index"]) == ("capfilt", 1, 17)  # a noisy web caption was kept
    assert (out["caption_sources"], out["itm_scores"], out["itc_scores"]) == (["web", "synthetic"], [0.9, 0.75],
                                                                             [0.4, 0.25])
    vqa = output_row(dict(row, task="vqa", answer="yes"), 3, kept[1:])
    assert (vqa["caption"], vqa["answer"], vqa["noisy"]) == ("new text", "yes", 0)


def test_readers_draw_one_kept_caption_per_visit() -> None:
    """BLIP-2 drew one of an image's kept captions per step: a pure function of the sample's seed."""
    from blip_train.data.schema import draw_caption

    row = {"caption": "a", "captions": ["a", "b", "c"], "source": "capfilt", "task": "caption", "answer": "a"}
    draws = [draw_caption(row, seed) for seed in range(60)]
    assert {d["caption"] for d in draws} == {"a", "b", "c"} and all(d["answer"] == d["caption"] for d in draws)
    assert [d["caption"] for d in draws] == [draw_caption(row, seed)["caption"] for seed in range(60)]
    web = dict(row, source="web")
    assert draw_caption(web, 5) is web  # other rows train on their own caption


def test_thresholds_keep_the_share_asked_for() -> None:
    from blip_train.capfilt.calibrate import joint_quantile

    g = np.random.default_rng(0)
    scores = np.stack([g.random(1000), g.normal(size=1000)], axis=1)
    for target in (0.5, 0.75, 0.9):
        q, t_itm, t_itc, share = joint_quantile(scores, target)
        assert target <= share <= target + 0.01 and 0 <= q <= 1 - target
        assert t_itm in scores[:, 0] and t_itc in scores[:, 1]  # observed scores, not interpolations
        assert np.mean((scores[:, 0] >= t_itm) & (scores[:, 1] >= t_itc)) == share
    with pytest.raises(ValueError, match="no captions to set thresholds on"):
        joint_quantile(np.zeros((0, 2)), 0.75)


def test_calibrated_thresholds_keep_the_target_share(model_and_tokenizer, noisy_split) -> None:
    from blip_train.capfilt.calibrate import calibrate

    model, tok = model_and_tokenizer
    rule = calibrate(model, tok, str(noisy_split), "keep_rate", 0.75, 512, image_size=32, max_txt_len=MAX_TXT_LEN)
    assert rule.samples == 20 and 0.75 <= rule.achieved <= 0.85
    again = calibrate(model, tok, str(noisy_split), "keep_rate", 0.75, 512, image_size=32, max_txt_len=MAX_TXT_LEN)
    assert again == rule  # a function of (model, split, rule): every rank and a resumed run find the same
    assert "keep 75% of the input's web captions" in rule.describe()


def test_itm_probability_and_seeded_sampling(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds, _ = model.encode_image(px)
    t = tok(["a red circle", "a blue square"], padding="max_length", max_length=MAX_TXT_LEN, return_tensors="pt")
    probs = model.itm_scores(embeds, t["input_ids"], t["attention_mask"], probability=True)
    logits = model._itm_logits(embeds, t["input_ids"], t["attention_mask"]).float()
    torch.testing.assert_close(probs, logits.softmax(-1)[:, 1])

    def sample(seed: int) -> torch.Tensor:
        return model.generate_captions(px, tok.bos_token_id, tok.sep_token_id, tok.pad_token_id, max_len=6,
                                       top_p=0.9, num_captions=3, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(123)
    a = sample(5)
    torch.manual_seed(456)  # the global RNG no longer matters
    assert torch.equal(a, sample(5)) and not torch.equal(a, sample(6))


# ------------------------------------------------------------------------------------ chunks and runs

def test_process_chunk_is_deterministic_and_counts_add_up(model_and_tokenizer, noisy_split) -> None:
    from streaming import LocalDataset
    model, tok = model_and_tokenizer
    ds = LocalDataset(str(noisy_split))
    samples = [(i, dict(ds[i])) for i in range(7)]
    s = settings(itm_threshold=0.0)  # everything passes: counts are exact
    rows, stats = process_chunk(model, tok, samples, s, torch.Generator().manual_seed(1))
    again, _ = process_chunk(model, tok, samples, s, torch.Generator().manual_seed(1))
    assert rows == again
    c = stats.counts
    assert c["images"] == 7 and c["web_kept"] == 7 and c["web_dropped"] == 0
    assert c["synthetic_generated"] == 21
    assert c["synthetic_kept"] == c["synthetic_candidates"] <= 14
    assert c["rows"] == len(rows) == 7 and c["captions_kept"] == 7 + c["synthetic_kept"]  # one row per image
    assert [r["orig_index"] for r in rows] == sorted(r["orig_index"] for r in rows)
    assert {s for r in rows for s in r["caption_sources"]} == {"web", "synthetic"}


def test_eval_pixels_at_sizes_are_one_decode_resized(noisy_split) -> None:
    """The largest size is EvalTransform's own pixels; a smaller one is the same image at its size."""
    from streaming import LocalDataset

    from blip_train.data.transforms import build_transform
    image = LocalDataset(str(noisy_split))[0]["image"]
    small, large = eval_pixels_at_sizes(image, (32, 48))
    assert small.shape == (3, 32, 32) and large.shape == (3, 48, 48)
    assert torch.equal(large, build_transform(48, train=False)(image))
    torch.testing.assert_close(small, build_transform(32, train=False)(image), atol=0.05, rtol=0)


def test_a_separate_captioner_writes_the_synthetic_captions(model_and_tokenizer, noisy_split, tmp_path) -> None:
    """process_chunk with `captioner`: the synthetic captions are exactly what that model samples at its own image
    size from the chunk's generator (not the filter's), and the filter's scores are unchanged by it."""
    from streaming import LocalDataset
    model, tok = model_and_tokenizer
    torch.manual_seed(1)  # other weights and another input size than the filter's
    cap_cfg = tiny_model_config(max_txt_len=MAX_TXT_LEN, vision=tiny_vision_config(image_size=48),
                                qformer=tiny_qformer_config(vocab_size=256))
    cap_model = Blip2Stage1(cap_cfg, device_type="cpu").eval()
    captioner = Captioner(cap_model, tok, 48, run="captioner-run")
    ds = LocalDataset(str(noisy_split))
    samples = [(i, dict(ds[i])) for i in range(4)]
    s = settings(itm_threshold=0.0, keep_top=3, batch_size=4)  # everything passes: every distinct sample is kept
    rows, stats = process_chunk(model, tok, samples, s, torch.Generator().manual_seed(1), captioner)

    px = torch.stack([eval_pixels_at_sizes(r["image"], (48,))[0] for _, r in samples])  # (4, 3, 48, 48)
    ids = cap_model.generate_captions(px, tok.bos_token_id, tok.sep_token_id, tok.pad_token_id, max_len=s.max_len,
                                      top_p=s.top_p, num_captions=3, generator=torch.Generator().manual_seed(1))
    sampled = decode_captions(tok, ids)
    for b, row in enumerate(rows):
        synthetic = {c for c, src in zip(row["captions"], row["caption_sources"]) if src == "synthetic"}
        expected = {t for t in sampled[3 * b:3 * b + 3] if t}
        assert synthetic == expected - {row["captions"][0]}
    assert stats.counts["synthetic_kept"] > 0

    own, _ = process_chunk(model, tok, samples, s, torch.Generator().manual_seed(1))  # the filter captions
    assert [r["captions"] for r in own] != [r["captions"] for r in rows]
    assert [(r["captions"][0], r["itm_scores"][0], r["itc_scores"][0]) for r in own] == \
        [(r["captions"][0], r["itm_scores"][0], r["itc_scores"][0]) for r in rows]  # the web caption, same filter

    # The captioner's run is part of the resume identity and the report's settings.
    out = tmp_path / "out"
    report = run_capfilt(model, tok, noisy_split, out, settings(itm_threshold=0.0, chunk_size=10),
                         captioner=captioner, max_chunks=1)
    assert report is None and json.loads((out / ".parts" / runner.SETTINGS_FILE).read_text())["captioner"] == \
        {"checkpoint": "captioner-run", "image_size": 48}
    with pytest.raises(ValueError, match="other settings \\(captioner\\)"):
        run_capfilt(model, tok, noisy_split, out, settings(itm_threshold=0.0, chunk_size=10))
    report = run_capfilt(model, tok, noisy_split, out, settings(itm_threshold=0.0, chunk_size=10),
                         captioner=captioner)
    assert report["settings"]["captioner"]["checkpoint"] == "captioner-run"


def test_process_chunk_raises_on_a_transform_bug_and_counts_only_bad_bytes(model_and_tokenizer, noisy_split,
                                                                           monkeypatch) -> None:
    from streaming import LocalDataset

    from blip_train.capfilt import capfilt
    model, tok = model_and_tokenizer
    ds = LocalDataset(str(noisy_split))
    samples = [(i, dict(ds[i])) for i in range(3)]
    samples[1][1]["image"] = b"\xff\xd8 not a jpeg"
    _, stats = process_chunk(model, tok, samples, settings(num_captions=0), torch.Generator().manual_seed(1))
    assert stats.counts["undecodable"] == 1 and stats.counts["images"] == 3

    def broken_transform(*args, **kwargs):
        def apply(image):
            raise TypeError("transform bug")
        return apply

    monkeypatch.setattr(capfilt, "build_transform", broken_transform)
    with pytest.raises(TypeError, match="transform bug"):
        process_chunk(model, tok, samples, settings(num_captions=0), torch.Generator().manual_seed(1))


def test_run_writes_schema_split_with_provenance_and_report(model_and_tokenizer, noisy_split, tmp_path) -> None:
    model, tok = model_and_tokenizer
    out = tmp_path / "out"
    report = run_capfilt(model, tok, noisy_split, out, settings(itm_threshold=0.45), identity={"checkpoint": "x"})
    rows = read_rows(out)
    assert verify_split(out) == len(rows) == report["rows_written"]
    assert json.loads((out / SCHEMA_FILE).read_text())["extra_columns"] == EXTRA_COLUMNS
    assert set(rows[0]) == set(COLUMNS) | set(EXTRA_COLUMNS)
    assert not (out / runner.PARTS_DIR).exists()
    assert json.loads((out / REPORT_FILE).read_text()) == report
    assert report["images_seen"] == 20 and report["settings"]["checkpoint"] == "x"
    noise = report["noise"]
    assert noise["noisy_web"] + noise["clean_web"] == 20 and noise["noisy_web"] == 6
    assert all(r["source"] == "capfilt" for r in rows) and len({r["orig_index"] for r in rows}) == len(rows)
    assert sum(r["caption_sources"].count("web") for r in rows) == report["web"]["kept"]
    assert all(s >= 0.45 for r in rows for s in r["itm_scores"])
    assert sum(len(r["captions"]) for r in rows) == report["captions_kept"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_capfilt(model, tok, noisy_split, out, settings(itm_threshold=0.45), identity={"checkpoint": "x"})


def test_crash_then_rerun_skips_finished_chunks_and_matches_one_run(model_and_tokenizer, noisy_split, tmp_path,
                                                                    monkeypatch) -> None:
    model, tok = model_and_tokenizer
    s = settings(itm_threshold=0.45)
    reference = run_capfilt(model, tok, noisy_split, tmp_path / "ref", s)
    out = tmp_path / "out"
    calls: list[int] = []
    real = runner.process_chunk

    def crash_on_third(m, t, samples, st, generator, captioner=None):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(samples[0][0])
        return real(m, t, samples, st, generator, captioner)

    monkeypatch.setattr(runner, "process_chunk", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_capfilt(model, tok, noisy_split, out, s)
    assert sorted(p.name for p in (out / runner.PARTS_DIR).glob("chunk_*.json")) == ["chunk_000000.json",
                                                                                   "chunk_000001.json"]
    # Another run with other settings must not mix into this one.
    with pytest.raises(ValueError, match="other settings"):
        run_capfilt(model, tok, noisy_split, out, settings(itm_threshold=0.3))

    calls.clear()
    monkeypatch.setattr(runner, "process_chunk", lambda *a: (calls.append(a[2][0][0]), real(*a))[1])
    assert run_capfilt(model, tok, noisy_split, out, s, max_chunks=1) is None  # time-boxed: one chunk, no merge
    report = run_capfilt(model, tok, noisy_split, out, s)
    assert calls == [12, 18]  # chunks 0 and 1 (indices 0-11) were not recomputed
    assert report == reference
    assert read_rows(out) == read_rows(tmp_path / "ref")


def test_keeping_too_little_writes_nothing_and_says_why(model_and_tokenizer, noisy_split, tmp_path) -> None:
    model, tok = model_and_tokenizer
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"only 0 of 20 images kept a caption \(0.0% < --min-keep 5%\)"):
        run_capfilt(model, tok, noisy_split, out, settings(itm_threshold=1.0, num_captions=0))
    assert not (out / "index.json").exists()  # never a valid (empty) dataset
    # the chunks stay: merging again with a lower bar needs no recomputation
    report = run_capfilt(model, tok, noisy_split, out, settings(itm_threshold=1.0, num_captions=0, min_keep=0.0))
    assert report["rows_written"] == 0


def test_write_split_extra_columns(tmp_path) -> None:
    from blip_train.data.images import encode_jpeg
    from PIL import Image
    img = encode_jpeg(Image.new("RGB", (8, 8)))
    write_split(tmp_path / "s", [{"image": img, "caption": "c", "orig_index": 3, "caption_sources": ["web"],
                                  "itm_scores": [0.5], "itc_scores": [0.1]}], extra_columns=EXTRA_COLUMNS)
    assert verify_split(tmp_path / "s") == 1
    assert read_rows(tmp_path / "s")[0]["orig_index"] == 3
    with pytest.raises(ValueError, match="lacks extra columns"):
        write_split(tmp_path / "t", [{"image": img}], extra_columns=EXTRA_COLUMNS)
    with pytest.raises(ValueError, match="redefine"):
        write_split(tmp_path / "u", [], extra_columns={"caption": "str"})
