"""Converters end to end on inputs built here, including every kind of bad input, with exact counts."""
from __future__ import annotations

import io
import json
import runpy
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, clean_env
from tests.unit.test_data_images import encode, png_header_only

TOOLS = REPO / "tools"
CONVERTERS = sorted(p.name for p in TOOLS.glob("convert_*.py"))  # every converter, new ones included

# Bad image files written by `image_dir` and the reason each is skipped for.
BAD_IMAGES = {"zero.jpg": "empty_file", "trunc.jpg": "unreadable_image", "garbage.jpg": "unreadable_image",
              "huge.png": "too_large", "tiny.png": "too_small", "bomb.png": "decompression_bomb",
              "absent.jpg": "missing_file"}
GOOD_IMAGES = ["rgb.jpg", "rgba.png", "cmyk.jpg", "grey.png", "palette.gif", "deep.png"]


def _image_bytes() -> dict[str, bytes]:
    rgb = encode(Image.new("RGB", (32, 24), (200, 30, 30)), "JPEG")
    return {
        "rgb.jpg": rgb,
        "rgba.png": encode(Image.new("RGBA", (32, 32), (0, 0, 255, 128)), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (32, 32), (0, 200, 200, 0)), "JPEG"),
        "grey.png": encode(Image.new("L", (32, 32), 90), "PNG"),
        "palette.gif": encode(Image.new("P", (32, 32), 5), "GIF"),
        "deep.png": encode(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG"),
        "zero.jpg": b"",
        "trunc.jpg": rgb[: len(rgb) // 2],
        "garbage.jpg": b"<html>404 not found</html>",
        "huge.png": png_header_only(30000, 10),
        "tiny.png": encode(Image.new("RGB", (4, 4)), "PNG"),
        "bomb.png": png_header_only(15000, 15000),
    }


def image_dir(root: Path, prefix: str = "") -> Path:
    d = root / "images"
    d.mkdir(parents=True, exist_ok=True)
    for name, data in _image_bytes().items():
        (d / f"{prefix}{name}").write_bytes(data)
    return d


def run(tool: str, *args: str, capsys) -> tuple[int, str, str]:
    """Run a tool's CLI in this process; return (exit code, stdout, stderr)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    old = sys.argv
    sys.argv = [tool, *args]
    try:
        runpy.run_path(str(TOOLS / tool), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def read_split(path: Path) -> list[dict]:
    from streaming import StreamingDataset
    ds = StreamingDataset(local=str(path), batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    for r in rows:
        im = Image.open(io.BytesIO(r["image"]))
        im.load()
        assert im.mode == "RGB" and im.format in ("JPEG", "PNG")
    return rows


def test_coco_with_every_bad_input(tmp_path, capsys):
    images = image_dir(tmp_path)
    names = GOOD_IMAGES + list(BAD_IMAGES)
    coco = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)], "annotations": []}
    for i, _ in enumerate(names):
        coco["annotations"] += [{"image_id": i + 1, "caption": f"A photo number {i}."},
                                {"image_id": i + 1, "caption": f"another view {i}"}]
    coco["annotations"][0]["caption"] = "   "        # empty_text (on a good image)
    coco["annotations"][2]["caption"] = "bad \ud800"  # bad_text_encoding (lone surrogate)
    coco["annotations"].append({"image_id": 999, "caption": "orphan"})  # unknown_image_id
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    code, stdout, err = run("convert_coco.py", "--images", str(images), "--annotations", str(ann),
                            "--out", str(out), "--workers", "2", capsys=capsys)
    assert code == 0, err
    s = summary(stdout)
    expected = Counter({r: 2 for r in BAD_IMAGES.values()})
    expected["unreadable_image"] = 4
    expected.update(empty_text=1, bad_text_encoding=1, unknown_image_id=1)
    assert s["skipped"] == dict(expected)
    assert s["skipped_images"] == dict(Counter(BAD_IMAGES.values()))
    assert (s["written"], s["images"]) == (10, 6)
    rows = read_split(out)
    assert len(rows) == 10 and rows[0]["caption"] == "another view 0" and rows[0]["captions"] == ["another view 0"]
    assert rows[2]["captions"] == ["A photo number 2.", "another view 2"] and rows[2]["image_id"] == 3
    assert {r["task"] for r in rows} == {"caption"} and {r["dataset"] for r in rows} == {"coco"}
    # The RGBA image was composited on white, not on black.
    rgba = next(r for r in rows if r["image_id"] == 2)
    assert np.asarray(Image.open(io.BytesIO(rgba["image"]))).mean() > 150

    code, _, err = run("convert_coco.py", "--images", str(images), "--annotations", str(ann), "--out", str(out),
                       capsys=capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {out} exists; pass --overwrite to replace it"]
    code, stdout, _ = run("convert_coco.py", "--images", str(images), "--annotations", str(ann), "--out", str(out),
                          "--overwrite", "--per-image", "--workers", "1", capsys=capsys)
    assert code == 0 and summary(stdout)["written"] == 6


def test_converters_store_pre_resized_images_and_report_the_bytes_saved(tmp_path, capsys):
    from tests.unit.test_data_transforms import photo

    images = tmp_path / "images"
    images.mkdir()
    big = encode(photo(2048, 1536), "JPEG", quality=94)
    small = encode(photo(640, 480), "JPEG", quality=94)
    (images / "big.jpg").write_bytes(big)
    (images / "small.jpg").write_bytes(small)
    ann = tmp_path / "c.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "big.jpg"}, {"id": 2, "file_name": "small.jpg"}],
                               "annotations": [{"image_id": 1, "caption": "big"}, {"image_id": 2, "caption": "small"}]}))
    code, stdout, err = run("convert_coco.py", "--images", str(images), "--annotations", str(ann),
                            "--out", str(tmp_path / "o"), "--workers", "1", capsys=capsys)
    assert code == 0, err
    s = summary(stdout)
    stored = {r["image_id"]: r["image"] for r in read_split(tmp_path / "o")}
    assert Image.open(io.BytesIO(stored[1])).size == (683, 512) and stored[2] == small  # default: short side 512
    assert s["image_bytes_read"] == len(big) + len(small)
    assert s["image_bytes_stored"] == len(stored[1]) + len(small)
    assert s["image_bytes_saved"] == len(big) - len(stored[1]) > 0
    assert "saved (" in stdout.splitlines()[-2]
    code, stdout, err = run("convert_coco.py", "--images", str(images), "--annotations", str(ann), "--out",
                            str(tmp_path / "o2"), "--workers", "1", "--resize-short-side", "0", capsys=capsys)
    assert code == 0 and summary(stdout)["image_bytes_saved"] == 0
    assert {r["image_id"]: r["image"] for r in read_split(tmp_path / "o2")} == {1: big, 2: small}


def test_coco_karpathy_formats(tmp_path, capsys):
    images = image_dir(tmp_path)
    (images / "val2014").mkdir()
    (images / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(_image_bytes()["rgb.jpg"])
    lavis = [{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "a red thing", "image_id": "coco_42"},
             {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "red", "image_id": "coco_42"},
             {"image": "grey.png", "caption": ["grey one", "grey two"]}]
    (tmp_path / "k.json").write_text(json.dumps(lavis))
    code, stdout, err = run("convert_coco.py", "--images", str(images), "--annotations", str(tmp_path / "k.json"),
                            "--out", str(tmp_path / "o1"), "--workers", "1", capsys=capsys)
    assert code == 0, err
    rows = read_split(tmp_path / "o1")
    assert [(r["image_id"], r["caption"]) for r in rows] == [(42, "a red thing"), (42, "red"), (1, "grey one"),
                                                              (1, "grey two")]
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "split": "restval",
         "sentences": [{"raw": "a red square."}]},
        {"filepath": "", "filename": "grey.png", "cocoid": 7, "split": "test", "sentences": [{"raw": "grey"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    code, stdout, err = run("convert_coco.py", "--images", str(images), "--annotations",
                            str(tmp_path / "dataset_coco.json"), "--split", "train", "--out", str(tmp_path / "o2"),
                            "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert [(r["image_id"], r["caption"]) for r in read_split(tmp_path / "o2")] == [(42, "a red square.")]

    def refused(*args: str) -> str:
        code, _, err = run("convert_coco.py", "--images", str(images), "--out", str(tmp_path / "o3"), "--workers", "1",
                           *args, capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err.strip()

    karpathy_file = str(tmp_path / "dataset_coco.json")
    assert refused("--annotations", karpathy_file) == (
        f"error: {karpathy_file} holds several splits (restval, test): choose one with --split (train includes "
        "restval)")
    assert refused("--annotations", karpathy_file, "--split", "val") == (
        f"error: --split val: {karpathy_file} has no such split (present: restval, test)")
    assert "has no split field" in refused("--annotations", str(tmp_path / "k.json"), "--split", "test")
    coco = {"images": [{"id": 1, "file_name": "grey.png"}], "annotations": [{"image_id": 1, "caption": "grey"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert "is a COCO captions file, which has no splits" in refused("--annotations", str(tmp_path / "captions.json"),
                                                                      "--split", "test")
    assert refused("--annotations", str(tmp_path)) == f"error: {tmp_path}: is a directory; expected a JSON file"
    assert not (tmp_path / "o3").exists()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_with_every_bad_input(tmp_path, capsys):
    b = _image_bytes()
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", [
        ("s/000.jpg", b["rgb.jpg"]), ("s/000.txt", b"a red photo"),
        ("s/001.png", b["rgba.png"]), ("s/001.json", json.dumps({"caption": "blue glass", "key": "1"}).encode()),
        ("s/002.jpg", b["rgb.jpg"]), ("s/002.txt", b"caf\xe9 latin-1"),        # bad_text_encoding
        ("s/003.jpg", b["rgb.jpg"]), ("s/003.txt", b"  \n "),                  # empty_text
        ("s/004.txt", b"caption without image"),                               # missing_image
        ("s/005.jpg", b["rgb.jpg"]),                                           # missing_text
        ("s/006.jpg", b""), ("s/006.txt", b"zero bytes"),                      # empty_file
        ("s/007.jpg", b["trunc.jpg"]), ("s/007.txt", b"truncated"),            # unreadable_image
        ("s/008.jpg", b["rgb.jpg"]), ("s/008.json", b"{not json"),             # malformed_record
        ("s/009.png", b["huge.png"]), ("s/009.txt", b"huge"),                  # too_large
        ("s/010.png", b["tiny.png"]), ("s/010.txt", b"tiny"),                  # too_small
        ("s/011.png", b["bomb.png"]), ("s/011.txt", b"bomb"),                  # decompression_bomb
    ])
    _tar(shards / "00001.tar", [("a.jpg", b["cmyk.jpg"]), ("a.txt", b"cmyk"), ("b.png", b["deep.png"]),
                                ("b.json", b'{"caption": "sixteen bit"}'), ("c.gif", b["palette.gif"]),
                                ("c.txt", "caf\u00e9 \u2615".encode())])
    (shards / "00002.tar").write_bytes(b"garbage, not a tar archive" * 40)   # unreadable_shard
    out = tmp_path / "out"
    code, stdout, err = run("convert_webdataset.py", "--shards", str(shards / "*.tar"), "--out", str(out),
                            "--workers", "2", capsys=capsys)
    assert code == 0, err
    s = summary(stdout)
    assert s["skipped"] == {"bad_text_encoding": 1, "empty_text": 1, "missing_image": 1, "missing_text": 1,
                            "empty_file": 1, "unreadable_image": 1, "malformed_record": 1, "too_large": 1,
                            "too_small": 1, "decompression_bomb": 1, "unreadable_shard": 1}
    rows = read_split(out)
    assert [r["caption"] for r in rows] == ["a red photo", "blue glass", "cmyk", "sixteen bit", "caf\u00e9 \u2615"]
    ids = [r["image_id"] for r in rows]
    assert ids == sorted(set(ids)) and {r["source"] for r in rows} == {"web"}  # unique, in shard order

    code, _, err = run("convert_webdataset.py", "--shards", str(tmp_path / "none*.tar"), "--out",
                       str(tmp_path / "o2"), capsys=capsys)
    assert code == 2 and "no tar shards match" in err


def test_vqa_and_gqa(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    b = _image_bytes()
    (images / "COCO_val2014_000000000001.jpg").write_bytes(b["rgb.jpg"])
    (images / "COCO_val2014_000000000002.jpg").write_bytes(b["cmyk.jpg"])
    (images / "COCO_val2014_000000000003.jpg").write_bytes(b["trunc.jpg"])
    qs = {"questions": [
        {"image_id": 1, "question": "What color?", "question_id": 10},
        {"image_id": 1, "question": "How many?", "question_id": 11},
        {"image_id": 2, "question": "Is it cyan?", "question_id": 20},
        {"image_id": 2, "question": " ", "question_id": 21},          # empty_text
        {"image_id": 2, "question": "Unanswered?", "question_id": 22},  # missing_annotation
        {"image_id": 2, "question": "No answers?", "question_id": 23},  # empty_text (annotated, no answer)
        {"image_id": 3, "question": "Broken?", "question_id": 30},    # unreadable_image
        {"image_id": 4, "question": "No file?", "question_id": 40},   # missing_file
    ]}
    answers = lambda main, alt: [{"answer": a, "answer_id": i} for i, a in enumerate([main] * 8 + [alt] * 2)]
    anns = {"annotations": [
        {"question_id": 10, "image_id": 1, "multiple_choice_answer": "red", "answers": answers("red", "maroon")},
        {"question_id": 11, "image_id": 1, "answers": answers("2", "two")},
        {"question_id": 20, "image_id": 2, "multiple_choice_answer": "yes", "answers": answers("yes", "no")},
        {"question_id": 21, "image_id": 2, "multiple_choice_answer": "no", "answers": answers("no", "no")},
        {"question_id": 23, "image_id": 2, "answers": []},
        {"question_id": 30, "image_id": 3, "multiple_choice_answer": "no", "answers": answers("no", "no")},
        {"question_id": 40, "image_id": 4, "multiple_choice_answer": "no", "answers": answers("no", "no")},
    ]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    code, stdout, err = run("convert_vqa.py", "--images", str(images), "--questions", str(tmp_path / "q.json"),
                            "--annotations", str(tmp_path / "a.json"), "--out", str(tmp_path / "o"),
                            "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert summary(stdout)["skipped"] == {"empty_text": 2, "missing_annotation": 1, "unreadable_image": 1,
                                          "missing_file": 1}
    rows = read_split(tmp_path / "o")
    assert [(r["question_id"], r["question"], r["answer"]) for r in rows] == [
        (10, "What color?", "red"), (11, "How many?", "2"), (20, "Is it cyan?", "yes")]
    assert rows[0]["answers"] == ["red"] * 8 + ["maroon"] * 2 and rows[0]["task"] == "vqa"
    assert rows[0]["caption"] == "" and rows[0]["image_id"] == 1

    code, stdout, err = run("convert_vqa.py", "--images", str(images), "--questions", str(tmp_path / "q.json"),
                            "--out", str(tmp_path / "test"), "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert [r["answers"] for r in read_split(tmp_path / "test")] == [[]] * 5  # test split: no answers

    (images / "n123.jpg").write_bytes(b["grey.png"])
    gqa = {"0517": {"imageId": "n123", "question": "Is it grey?", "answer": "yes", "fullAnswer": "Yes, it is."},
           "0518": {"question": "Where?", "answer": "left"},                     # malformed_record
           "0519": {"imageId": "n123", "question": "What?", "answer": ""}}      # empty_text
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    code, stdout, err = run("convert_vqa.py", "--images", str(images), "--gqa", str(tmp_path / "gqa.json"),
                            "--out", str(tmp_path / "g"), "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert summary(stdout)["skipped"] == {"malformed_record": 1, "empty_text": 1}
    (row,) = read_split(tmp_path / "g")
    assert (row["image_id"], row["question_id"], row["answer"], row["dataset"]) == (123, 517, "yes", "gqa")


def test_instruct_json(tmp_path, capsys):
    images = image_dir(tmp_path)
    data = [
        {"id": "a", "image": "rgb.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red image."},
            {"from": "human", "value": "Is it bright?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "c", "image": "grey.png", "conversations": "oops"},
        {"id": "d", "image": "grey.png", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "  "}]},
        {"id": "e", "image": "absent.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(data))
    code, stdout, err = run("convert_instruct_json.py", "--images", str(images), "--json", str(tmp_path / "llava.json"),
                            "--out", str(tmp_path / "o"), "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert summary(stdout)["skipped"] == {"missing_image": 1, "malformed_record": 1, "empty_text": 1,
                                          "missing_file": 1}
    rows = read_split(tmp_path / "o")
    assert [(r["question"], r["answer"], r["task"]) for r in rows] == [
        ("What is shown?", "A red image.", "conversation"), ("Is it bright?", "Yes.", "conversation")]


@pytest.mark.parametrize("tool,flag", [("convert_coco.py", "--annotations"), ("convert_vqa.py", "--questions"),
                                       ("convert_vqa.py", "--gqa"), ("convert_instruct_json.py", "--json")])
def test_malformed_json_is_one_line_error(tmp_path, capsys, tool, flag):
    images = image_dir(tmp_path)
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [1, 2,')
    code, stdout, err = run(tool, "--images", str(images), flag, str(bad), "--out", str(tmp_path / "o"), capsys=capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {bad}: malformed JSON")
    bad.write_bytes(b'["\xff\xfe"]')
    code, _, err = run(tool, "--images", str(images), flag, str(bad), "--out", str(tmp_path / "o"), capsys=capsys)
    assert code == 2 and err.strip().startswith(f"error: {bad}: not UTF-8")
    code, _, err = run(tool, "--images", str(tmp_path / "nodir"), flag, str(bad), "--out", str(tmp_path / "o"),
                       capsys=capsys)
    assert code == 2 and "nodir: images directory does not exist" in err


def test_no_usable_sample_is_an_error(tmp_path, capsys):
    images = image_dir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps([{"image": "zero.jpg", "caption": "x"}]))
    code, _, err = run("convert_coco.py", "--images", str(images), "--annotations", str(tmp_path / "c.json"),
                       "--out", str(tmp_path / "o"), "--workers", "1", capsys=capsys)
    assert code == 2 and "no usable samples" in err and "empty_file=1" in err and not (tmp_path / "o").exists()


def test_help_of_every_tool():
    for tool in CONVERTERS + ["make_synthetic_dataset.py"]:
        r = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], env=clean_env(), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "--out" in r.stdout and "--overwrite" in r.stdout, tool


@pytest.mark.parametrize("tool", ["capfilt.py", "export_hf.py", "zero_to_safetensors.py", "import_ulip2_pointbert.py"])
def test_missing_checkpoint_is_one_line_error(tmp_path, tool):
    args = ["--checkpoint", str(tmp_path / "no_run"), "--out", str(tmp_path / "o")]
    if tool == "capfilt.py":
        args += ["--data", str(tmp_path)]
    r = subprocess.run([sys.executable, str(TOOLS / tool), *args], env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and "no_run" in line and not (tmp_path / "o").exists()


def test_nocaps_and_flickr30k(tmp_path, capsys):
    """NoCaps val (COCO-style captions, domains kept in `source`), NoCaps test (images only, --per-image) and
    Flickr30K's Karpathy file through convert_coco.py; bad files are one-line errors naming file and key."""
    images = image_dir(tmp_path)
    nocaps_images = [{"id": 0, "file_name": "rgb.jpg", "domain": "in-domain"},
                     {"id": 1, "file_name": "grey.png", "domain": "out-domain"},
                     {"id": 2, "file_name": "zero.jpg", "domain": "near-domain"}]
    val = {"images": nocaps_images,
           "annotations": [{"image_id": i % 3, "id": i, "caption": f"caption {i}"} for i in range(6)]}
    (tmp_path / "nocaps_val_4500_captions.json").write_text(json.dumps(val))
    code, stdout, err = run("convert_coco.py", "--images", str(images), "--annotations",
                            str(tmp_path / "nocaps_val_4500_captions.json"), "--per-image", "--out",
                            str(tmp_path / "val"), "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert summary(stdout)["skipped"] == {"empty_file": 1}  # one row per image (--per-image)
    rows = read_split(tmp_path / "val")
    assert [(r["image_id"], r["captions"], r["dataset"], r["source"]) for r in rows] == [
        (0, ["caption 0", "caption 3"], "nocaps", "nocaps/in-domain"),
        (1, ["caption 1", "caption 4"], "nocaps", "nocaps/out-domain")]

    test = {"info": {}, "images": nocaps_images + [{"id": 3, "file_name": "", "domain": "in-domain"}]}
    (tmp_path / "nocaps_test_image_info.json").write_text(json.dumps(test))
    code, stdout, err = run("convert_coco.py", "--images", str(images), "--annotations",
                            str(tmp_path / "nocaps_test_image_info.json"), "--per-image", "--out",
                            str(tmp_path / "test"), "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert summary(stdout)["skipped"] == {"empty_file": 1, "missing_image": 1}
    rows = read_split(tmp_path / "test")
    assert [(r["image_id"], r["caption"], r["captions"], r["source"]) for r in rows] == [
        (0, "", [], "nocaps/in-domain"), (1, "", [], "nocaps/out-domain")]

    flickr = {"dataset": "flickr30k", "images": [
        {"filename": "rgb.jpg", "imgid": 0, "split": "train", "sentids": [0, 1],
         "sentences": [{"raw": "A red square .", "tokens": ["a", "red", "square"]}, {"raw": "red"}]},
        {"filename": "grey.png", "imgid": 1, "split": "test", "sentences": [{"raw": "grey one"}, {"raw": "grey two"}]},
        {"filename": "palette.gif", "imgid": 2, "split": "val", "sentences": [{"raw": "dark"}]}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    for split, per_image, want in [("train", False, [(0, "A red square ."), (0, "red")]),
                                   ("test", True, [(1, "grey one")])]:
        out = tmp_path / f"flickr_{split}"
        code, stdout, err = run("convert_coco.py", "--images", str(images), "--annotations",
                                str(tmp_path / "dataset_flickr30k.json"), "--split", split, "--out", str(out),
                                "--workers", "1", *(["--per-image"] if per_image else []), capsys=capsys)
        assert code == 0, err
        rows = read_split(out)
        assert [(r["image_id"], r["caption"]) for r in rows] == want
        assert {r["dataset"] for r in rows} == {"flickr30k"}
    assert read_split(tmp_path / "flickr_test")[0]["captions"] == ["grey one", "grey two"]

    def refused(annotations: Path, *args: str) -> str:
        code, _, err = run("convert_coco.py", "--images", str(images), "--annotations", str(annotations),
                           "--out", str(tmp_path / "bad"), "--workers", "1", *args, capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err.strip()

    test_file = tmp_path / "nocaps_test_image_info.json"
    assert refused(test_file) == (f"error: {test_file}: has 'images' but no 'annotations' (captions), nothing to "
                                  "train on; an image-info file such as NoCaps test converts with --per-image, for "
                                  "generation only")
    (tmp_path / "nocaps_bad.json").write_text(json.dumps({"images": {"0": "rgb.jpg"}}))
    assert refused(tmp_path / "nocaps_bad.json", "--per-image") == (
        f"error: {tmp_path / 'nocaps_bad.json'}: 'images' must be a list of image records, got dict")
    (tmp_path / "nocaps_bad2.json").write_text(json.dumps({"images": nocaps_images, "annotations": {"x": 1}}))
    assert "'annotations' must be a list" in refused(tmp_path / "nocaps_bad2.json", "--per-image")
    no_sentences = {"images": [{"filename": "rgb.jpg", "imgid": 0, "split": "test", "sents": ["red"]}]}
    (tmp_path / "dataset_flickr30k_bad.json").write_text(json.dumps(no_sentences))
    assert refused(tmp_path / "dataset_flickr30k_bad.json", "--split", "test") == (
        f"error: {tmp_path / 'dataset_flickr30k_bad.json'}: no record of images has 'sentences' or 'caption' "
        "(Karpathy format: images[].filename, split, sentences[].raw)")
    assert not (tmp_path / "bad").exists()


def test_visual_genome_qa(tmp_path, capsys):
    images = tmp_path / "vg"
    (images / "VG_100K").mkdir(parents=True)
    (images / "VG_100K_2").mkdir()
    b = _image_bytes()
    (images / "VG_100K" / "1.jpg").write_bytes(b["rgb.jpg"])
    (images / "VG_100K_2" / "2.jpg").write_bytes(b["grey.png"])
    qa = [{"id": 1, "qas": [{"qa_id": 7, "image_id": 1, "question": "What color is it?", "answer": "Red."},
                            {"qa_id": 8, "image_id": 1, "question": "Where?", "answer": " "},      # empty_text
                            {"qa_id": 11, "image_id": 1, "question": "Why?", "answer": "."},       # empty_text
                            {"image_id": 1, "question": "No id?", "answer": "x"}]},               # malformed_record
          {"id": 2, "qas": [{"qa_id": 9, "image_id": 2, "question": "Is it grey?", "answer": "yes"}]},
          {"id": 3, "qas": [{"qa_id": 10, "image_id": 3, "question": "Missing?", "answer": "no"}]},  # missing_file
          {"qas": []}]                                                                              # malformed_record
    (tmp_path / "question_answers.json").write_text(json.dumps(qa))
    code, stdout, err = run("convert_vqa.py", "--images", str(images), "--vg-qa", str(tmp_path / "question_answers.json"),
                            "--out", str(tmp_path / "o"), "--workers", "1", capsys=capsys)
    assert code == 0, err
    assert summary(stdout)["skipped"] == {"empty_text": 2, "malformed_record": 2, "missing_file": 1}
    rows = read_split(tmp_path / "o")
    assert [(r["image_id"], r["question_id"], r["question"], r["answer"], r["answers"], r["dataset"]) for r in rows] == [
        (1, 7, "What color is it?", "Red", ["Red"], "vg_qa"), (2, 9, "Is it grey?", "yes", ["yes"], "vg_qa")]

    (tmp_path / "bad.json").write_text(json.dumps({"qas": []}))
    code, _, err = run("convert_vqa.py", "--images", str(images), "--vg-qa", str(tmp_path / "bad.json"),
                       "--out", str(tmp_path / "o2"), "--workers", "1", capsys=capsys)
    assert code == 2 and err.strip() == (f"error: {tmp_path / 'bad.json'}: expected Visual Genome "
                                         "question_answers.json, a list of {id, qas: [...]}")
    code, _, err = run("convert_vqa.py", "--images", str(images), "--vg-qa", str(tmp_path / "bad.json"),
                       "--gqa", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o2"), capsys=capsys)
    assert code == 2 and err.strip() == "error: give exactly one of --questions (VQAv2/OK-VQA), --gqa or --vg-qa"
