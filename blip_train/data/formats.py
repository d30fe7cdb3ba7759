"""Readers of public dataset formats, yielding `ImageJob`s in the blip-train schema.

COCO captions (and Karpathy splits), WebDataset tar shards, VQAv2 / OK-VQA, GQA and LLaVA-style
instruction JSON. Readers only parse; a structurally unusable file raises `InputError`, a bad
individual record is counted in `stats` under a reason and skipped.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional

from blip_train.data.convert import EMPTY_TEXT, ConvertStats, ImageJob, InputError, clean_text, load_json, require_dir

MISSING_IMAGE = "missing_image"          # a record names no image (or a tar key has no image member)
MISSING_TEXT = "missing_text"            # a tar key has no .txt/.json caption
UNKNOWN_IMAGE_ID = "unknown_image_id"    # a COCO annotation for an image id not in `images`
MISSING_ANNOTATION = "missing_annotation"  # a VQA question without answers in the annotation file
MALFORMED_RECORD = "malformed_record"    # a record of the wrong shape (or a tar member with bad JSON)
UNREADABLE_SHARD = "unreadable_shard"    # a tar that cannot be opened/read to the end (counts 1)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_TRAILING_INT = re.compile(r"(\d+)$")


def trailing_int(name: str) -> Optional[int]:
    """123456 for 'COCO_val2014_000000123456', 'coco_123456' or 'n123456'; None without digits."""
    m = _TRAILING_INT.search(Path(str(name)).stem if "." in str(name) else str(name))
    return int(m.group(1)) if m else None


def _resolve(images_dir: Path, rel: str) -> str:
    # Annotation paths are relative to different roots in different releases ('val2014/x.jpg'
    # vs 'x.jpg'): fall back to the bare file name before calling the file missing.
    path = images_dir / rel
    if not path.is_file() and (images_dir / Path(rel).name).is_file():
        path = images_dir / Path(rel).name
    return str(path)


def _captions(values: list[Any], stats: ConvertStats) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("raw", v.get("caption"))
        text, reason = clean_text(v)
        if text is None:
            stats.skip(reason)
        else:
            out.append(text)
    return out


def _caption_rows(image_id: int, captions: list[str], per_image: bool, dataset: str,
                  source: Optional[str] = None) -> list[dict[str, Any]]:
    base = {"image_id": image_id, "captions": captions, "task": "caption", "dataset": dataset,
            "source": source or dataset}
    if per_image:
        return [dict(base, caption=captions[0])]
    return [dict(base, caption=c) for c in captions]


def read_coco(images_dir: str, annotations: str, stats: ConvertStats, *, split: Optional[str] = None,
              per_image: bool = False, dataset: str = "coco") -> Iterator[ImageJob]:
    """COCO captions ({images, annotations}; also NoCaps val), Karpathy's dataset_coco.json and
    dataset_flickr30k.json ({images: [{filename, split, sentences: [{raw}]}]}), a LAVIS-style list
    ([{image | filepath+filename, caption | sentences, image_id}]), or a COCO image-info file without
    captions ({images: [{id, file_name}]}, e.g. NoCaps test: only with `per_image`, rows without captions,
    for generating captions to submit).

    Default: one sample per caption (as stage 1/2 train); `per_image`: one sample per image with
    the first caption (evaluation splits). `captions` always holds all of the image's captions.
    """
    root = require_dir(images_dir, "images")
    data = load_json(annotations)
    if isinstance(data, dict) and "annotations" in data and not isinstance(data["annotations"], list):
        raise InputError(f"{annotations}: 'annotations' must be a list of {{image_id, caption}} records, got "
                         f"{type(data['annotations']).__name__}")
    if isinstance(data, dict) and "images" in data and not isinstance(data["images"], list):
        raise InputError(f"{annotations}: 'images' must be a list of image records, got "
                         f"{type(data['images']).__name__}")
    if _is_image_info(data):
        yield from _read_image_info(root, annotations, data, stats, split=split, per_image=per_image, dataset=dataset)
        return
    grouped: dict[str, tuple[int, list[Any]]] = {}  # path -> (image_id, raw captions), insertion order
    sources: dict[str, str] = {}  # path -> "<dataset>/<domain>" for NoCaps images (their domain)

    def add(rel: Any, image_id: Any, caps: Any) -> None:
        if not isinstance(rel, str) or not rel:
            stats.skip(MISSING_IMAGE)
            return
        caps = caps if isinstance(caps, list) else [caps]
        path = _resolve(root, rel)
        iid = image_id if isinstance(image_id, int) else trailing_int(str(image_id if image_id is not None else rel))
        prev = grouped.setdefault(path, (iid if iid is not None else len(grouped), []))
        prev[1].extend(caps)

    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        if split:
            raise InputError(f"--split {split}: {annotations} is a COCO captions file, which has no splits (it is "
                             "one split already; --split selects from Karpathy-style files)")
        records = [im for im in data.get("images", []) if isinstance(im, dict) and "id" in im]
        images = {im["id"]: im.get("file_name") for im in records}
        domains = {im["id"]: im["domain"] for im in records if isinstance(im.get("domain"), str) and im["domain"]}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or "image_id" not in ann:
                stats.skip(MALFORMED_RECORD)
            elif ann["image_id"] not in images:
                stats.skip(UNKNOWN_IMAGE_ID)
            else:
                add(images[ann["image_id"]], ann["image_id"], ann.get("caption"))
                rel = images[ann["image_id"]]
                if ann["image_id"] in domains and isinstance(rel, str) and rel:
                    sources[_resolve(root, rel)] = f"{dataset}/{domains[ann['image_id']]}"
    elif isinstance(data, dict) and isinstance(data.get("images"), list) or isinstance(data, list):
        entries = data["images"] if isinstance(data, dict) else data
        present = sorted({str(e["split"]) for e in entries if isinstance(e, dict) and e.get("split")})
        _check_split(annotations, split, present)
        wanted = {"train", "restval"} if split == "train" else ({split} if split else None)
        chosen = [e for e in entries if isinstance(e, dict) and (wanted is None or e.get("split") in wanted)]
        if chosen and not any("sentences" in e or "caption" in e for e in chosen):
            raise InputError(f"{annotations}: no record of {'images' if isinstance(data, dict) else 'the list'} has "
                             "'sentences' or 'caption' (Karpathy format: images[].filename, split, sentences[].raw)")
        for e in entries:
            if not isinstance(e, dict):
                stats.skip(MALFORMED_RECORD)
                continue
            if wanted is not None and e.get("split") not in wanted:
                continue
            rel = e.get("image") or (os.path.join(e.get("filepath", ""), e["filename"]) if e.get("filename") else None)
            caps = e.get("sentences", e.get("caption"))
            if caps is None:
                stats.skip(MALFORMED_RECORD)
                continue
            add(rel, e.get("image_id", e.get("cocoid", e.get("imgid"))), caps)
    else:
        raise InputError(f"{annotations}: expected COCO captions {{images, annotations}}, Karpathy "
                         "{images: [...sentences]} or a list of {image, caption} records")
    for path, (iid, raw) in grouped.items():
        caps = _captions(raw, stats)
        if caps:
            yield ImageJob(path, _caption_rows(iid, caps, per_image, dataset, sources.get(path)))


def _is_image_info(data: Any) -> bool:
    """A COCO-style file of images without captions: {images: [{id, file_name}, ...]} and no annotations."""
    if not isinstance(data, dict) or "annotations" in data or not isinstance(data.get("images"), list):
        return False
    records = [e for e in data["images"] if isinstance(e, dict)]
    return bool(records) and all("file_name" in e and "sentences" not in e for e in records)


def _read_image_info(root: Path, annotations: str, data: dict, stats: ConvertStats, *, split: Optional[str],
                     per_image: bool, dataset: str) -> Iterator[ImageJob]:
    """One caption-less row per image of an image-info file (NoCaps test); the image's NoCaps domain, when
    given, is kept in `source` (nocaps/in-domain | near-domain | out-domain) for per-domain scores."""
    if split:
        raise InputError(f"--split {split}: {annotations} is a COCO image-info file, which has no splits")
    if not per_image:
        raise InputError(f"{annotations}: has 'images' but no 'annotations' (captions), nothing to train on; an "
                         "image-info file such as NoCaps test converts with --per-image, for generation only")
    for e in data["images"]:
        if not isinstance(e, dict) or "id" not in e:
            stats.skip(MALFORMED_RECORD)
            continue
        rel = e.get("file_name")
        if not isinstance(rel, str) or not rel:
            stats.skip(MISSING_IMAGE)
            continue
        iid = e["id"] if isinstance(e["id"], int) else trailing_int(str(e["id"]))
        if iid is None:
            stats.skip(MALFORMED_RECORD)
            continue
        domain = e.get("domain")
        source = f"{dataset}/{domain}" if isinstance(domain, str) and domain else dataset
        yield ImageJob(_resolve(root, rel), [{"image_id": iid, "caption": "", "captions": [], "task": "caption",
                                              "dataset": dataset, "source": source}])


def _check_split(annotations: str, split: Optional[str], present: list[str]) -> None:
    """Refuse a --split the file does not have or does not know, and a multi-split file without one
    (converting Karpathy's dataset_coco.json whole would merge train and test)."""
    if split and not present:
        raise InputError(f"--split {split}: {annotations} has no split field (it is one split already)")
    if split and split not in present and not (split == "train" and "restval" in present):
        raise InputError(f"--split {split}: {annotations} has no such split (present: {', '.join(present)})")
    if not split and len(present) > 1:
        raise InputError(f"{annotations} holds several splits ({', '.join(present)}): choose one with --split "
                         "(train includes restval)")


def _tar_groups(tar_path: str, stats: ConvertStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for adjacent tar members sharing a key (WebDataset's layout rule)."""
    key, group = None, {}
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)  # WebDataset: key is up to the first dot
                k = os.path.join(dirname, stem)
                if k != key and group:
                    yield key, group
                    group = {}
                key = k
                f = tar.extractfile(member)
                group[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError):
        stats.skip(UNREADABLE_SHARD)
    if group:
        yield key, group


def read_webdataset(pattern: str, stats: ConvertStats, *, dataset: str = "web") -> Iterator[ImageJob]:
    """WebDataset shards: image member (.jpg/.jpeg/.png/...) + caption in .txt or .json {"caption"}."""
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise InputError(f"{pattern}: no tar shards match")
    next_id = 0
    for shard in shards:
        for _key, group in _tar_groups(shard, stats):
            image_ext = next((e for e in group if "." + e.split(".")[-1] in IMAGE_EXTS), None)
            if "txt" in group:
                raw: Any = group["txt"]
            elif "json" in group:
                try:
                    meta = json.loads(group["json"].decode("utf-8"))
                    raw = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
                except (UnicodeDecodeError, json.JSONDecodeError):
                    stats.skip(MALFORMED_RECORD)
                    continue
                if raw is None:
                    stats.skip(MISSING_TEXT)
                    continue
            else:
                stats.skip(MISSING_TEXT if image_ext else MISSING_IMAGE)
                continue
            if image_ext is None:
                stats.skip(MISSING_IMAGE)
                continue
            text, reason = clean_text(raw)
            if text is None:
                stats.skip(reason)
                continue
            row = {"image_id": next_id, "caption": text, "captions": [text], "task": "caption",
                   "dataset": dataset, "source": "web"}
            next_id += 1
            yield ImageJob(group[image_ext], [row])


def _image_index(root: Path) -> dict[int, str]:
    """Trailing number of each image file's stem → path (COCO_train2014_000000123456.jpg → 123456)."""
    index = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTS):
                n = trailing_int(name)
                if n is not None:
                    index.setdefault(n, os.path.join(dirpath, name))
    return index


def read_vqa(images_dir: str, questions: str, annotations: Optional[str], stats: ConvertStats, *,
             dataset: str = "vqav2") -> Iterator[ImageJob]:
    """VQAv2 / OK-VQA: {"questions": [...]} + {"annotations": [{answers: [{answer}], ...}]}.

    Without annotations (test splits) answers are empty. The training answer is the annotators'
    `multiple_choice_answer` when present, else the most frequent answer.
    """
    root = require_dir(images_dir, "images")
    qdata = load_json(questions)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise InputError(f"{questions}: expected a VQA questions file {{\"questions\": [...]}}")
    answers_by_q: Optional[dict[int, dict]] = None
    if annotations:
        adata = load_json(annotations)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise InputError(f"{annotations}: expected a VQA annotations file {{\"annotations\": [...]}}")
        answers_by_q = {a["question_id"]: a for a in adata["annotations"] if isinstance(a, dict) and "question_id" in a}
    index = _image_index(root)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for q in qdata["questions"]:
        if not isinstance(q, dict) or "image_id" not in q or "question_id" not in q:
            stats.skip(MALFORMED_RECORD)
            continue
        text, reason = clean_text(q.get("question"))
        if text is None:
            stats.skip(reason)
            continue
        answers: list[str] = []
        answer = ""
        if answers_by_q is not None:
            ann = answers_by_q.get(q["question_id"])
            if ann is None:
                stats.skip(MISSING_ANNOTATION)
                continue
            answers = [t for t in (clean_text(a.get("answer") if isinstance(a, dict) else a)[0]
                                   for a in ann.get("answers", [])) if t]
            answer = clean_text(ann.get("multiple_choice_answer"))[0] or (
                Counter(answers).most_common(1)[0][0] if answers else "")
            if not answer:
                stats.skip(EMPTY_TEXT)
                continue
        by_image[int(q["image_id"])].append(
            {"image_id": int(q["image_id"]), "question": text, "answer": answer, "answers": answers,
             "task": "vqa", "dataset": dataset, "question_id": int(q["question_id"]), "source": dataset})
    for image_id, rows in by_image.items():
        path = index.get(image_id)
        yield ImageJob(path if path is not None else str(root / f"<no file for image_id {image_id}>"), rows)


def read_gqa(images_dir: str, gqa_json: str, stats: ConvertStats, *, dataset: str = "gqa") -> Iterator[ImageJob]:
    """GQA questions {qid: {imageId, question, answer, fullAnswer}}; images are `<imageId>.jpg`."""
    root = require_dir(images_dir, "images")
    data = load_json(gqa_json)
    if not isinstance(data, dict):
        raise InputError(f"{gqa_json}: expected GQA questions {{question_id: {{imageId, question, answer}}}}")
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for n, (qid, q) in enumerate(data.items()):
        if not isinstance(q, dict) or not q.get("imageId"):
            stats.skip(MALFORMED_RECORD)
            continue
        question, r1 = clean_text(q.get("question"))
        answer, r2 = clean_text(q.get("answer"))
        if question is None or answer is None:
            stats.skip(r1 if question is None else r2)
            continue
        image = str(q["imageId"])
        iid = trailing_int(image)
        by_image[image].append({"image_id": iid if iid is not None else n, "question": question, "answer": answer,
                                "answers": [answer], "task": "vqa", "dataset": dataset, "source": dataset,
                                "question_id": trailing_int(str(qid)) if trailing_int(str(qid)) is not None else n})
    for image, rows in by_image.items():
        yield ImageJob(_resolve(root, image if image.lower().endswith(IMAGE_EXTS) else f"{image}.jpg"), rows)


def read_vg_qa(images_dir: str, qa_json: str, stats: ConvertStats, *, dataset: str = "vg_qa") -> Iterator[ImageJob]:
    """Visual Genome QA, its release's question_answers.json: [{id, qas: [{qa_id, image_id, question, answer}]}];
    images `<image_id>.jpg` anywhere under `images_dir` (VG_100K, VG_100K_2). One human answer per question
    (BLIP and BLIP-2 add these to VQAv2 for VQA fine-tuning); its trailing period is dropped."""
    root = require_dir(images_dir, "images")
    data = load_json(qa_json)
    if not isinstance(data, list):
        raise InputError(f"{qa_json}: expected Visual Genome question_answers.json, a list of {{id, qas: [...]}}")
    index = _image_index(root)
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("qas"), list) or "id" not in entry:
            stats.skip(MALFORMED_RECORD)
            continue
        rows = []
        for qa in entry["qas"]:
            if not isinstance(qa, dict) or "qa_id" not in qa:
                stats.skip(MALFORMED_RECORD)
                continue
            question, r1 = clean_text(qa.get("question"))
            answer, r2 = clean_text(qa.get("answer"))
            answer = answer.rstrip(".").strip() if answer else answer
            if question is None or not answer:
                stats.skip(r1 if question is None else (r2 if answer is None else EMPTY_TEXT))
                continue
            rows.append({"image_id": int(entry["id"]), "question": question, "answer": answer, "answers": [answer],
                         "task": "vqa", "dataset": dataset, "source": dataset, "question_id": int(qa["qa_id"])})
        if rows:
            path = index.get(int(entry["id"]))
            yield ImageJob(path if path is not None else str(root / f"<no file for image_id {entry['id']}>"), rows)


def read_llava(images_dir: str, json_file: str, stats: ConvertStats, *,
               dataset: str = "llava_instruct") -> Iterator[ImageJob]:
    """LLaVA-style [{image, conversations: [{from: human, value}, {from: gpt, value}, ...]}].

    One sample per (human, gpt) turn pair, task "conversation"; the `<image>` placeholder is removed
    (the image enters through the query tokens, not as a text token).
    """
    root = require_dir(images_dir, "images")
    data = load_json(json_file)
    if not isinstance(data, list):
        raise InputError(f"{json_file}: expected a list of {{image, conversations}} records")
    by_image: dict[str, list[dict[str, Any]]] = {}
    for e in data:
        turns = e.get("conversations") if isinstance(e, dict) else None
        if not isinstance(turns, list):
            stats.skip(MALFORMED_RECORD)
            continue
        if not isinstance(e.get("image"), str) or not e["image"]:
            stats.skip(MISSING_IMAGE)
            continue
        path = _resolve(root, e["image"])
        rows = by_image.setdefault(path, [])
        for human, gpt in zip(turns[0::2], turns[1::2]):
            if not (isinstance(human, dict) and isinstance(gpt, dict)
                    and human.get("from") == "human" and gpt.get("from") == "gpt"):
                stats.skip(MALFORMED_RECORD)
                continue
            raw_q = human.get("value").replace("<image>", " ") if isinstance(human.get("value"), str) else human.get("value")
            question, r1 = clean_text(raw_q)
            answer, r2 = clean_text(gpt.get("value"))
            if question is None or answer is None:
                stats.skip(r1 if question is None else r2)
                continue
            rows.append({"question": question, "answer": answer, "answers": [answer], "task": "conversation",
                         "dataset": dataset, "source": dataset})
    for n, (path, rows) in enumerate(by_image.items()):
        iid = trailing_int(Path(path).stem)
        for row in rows:
            row["image_id"] = iid if iid is not None else n
        if rows:
            yield ImageJob(path, rows)
