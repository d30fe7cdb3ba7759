#!/usr/bin/env python
"""Write the candidate answers of BLIP's ranking VQA inference (eval.answer_list): the most frequent training
answers, most frequent first.

    python tools/answer_list.py --annotations v2_mscoco_train2014_annotations.json \\
        --annotations v2_mscoco_val2014_annotations.json --top 3128 --out data/vqav2/answer_list.json
    python tools/answer_list.py --data data/mds/my_vqa_train --top 1000 --out data/my_vqa/answer_list.json

Each question counts once, with its training answer: VQAv2's `multiple_choice_answer` (the annotators' most
common answer), or an MDS split's `answer` column. VQAv2's list for BLIP has 3,128 answers. --annotations reads
the VQA annotation JSON alone (fast at any size); --data reads every row of a converted split, images included
(fine for small sets; for VQAv2 use the annotations). Answers are stripped; ties keep the order of first
appearance. The list is written atomically (a temporary file renamed into place).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

from _common import run_tool

from blip_train.data.convert import InputError


def count_annotation_answers(path: str, counts: Counter) -> int:
    """Add each question's multiple_choice_answer of a VQA annotations JSON to `counts`; returns questions read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"--annotations {path}: not JSON ({e})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise InputError(f"--annotations {path}: expected a VQA annotations file {{\"annotations\": [...]}}")
    n = 0
    for ann in anns:
        answer = ann.get("multiple_choice_answer") if isinstance(ann, dict) else None
        if isinstance(answer, str) and answer.strip():
            counts[answer.strip()] += 1
            n += 1
    return n


def count_split_answers(split: str, counts: Counter) -> int:
    """Add the `answer` of every question row of an MDS split to `counts`; returns questions read."""
    from streaming import StreamingDataset
    from tqdm import tqdm

    from blip_train.data.schema import verify_split
    from blip_train.data.shared_memory import build_streaming_dataset

    verify_split(split)
    ds = build_streaming_dataset(lambda: StreamingDataset(local=split, shuffle=False, batch_size=1))
    n = 0
    for i in tqdm(range(ds.num_samples), desc=f"answers {Path(split).name}", unit="row", mininterval=2):
        row = ds[i]
        if row["question"] and row["answer"].strip():
            counts[row["answer"].strip()] += 1
            n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", action="append", default=[], help="VQA annotations JSON (repeatable)")
    p.add_argument("--data", action="append", default=[], help="converted MDS VQA split (repeatable)")
    p.add_argument("--top", type=int, default=3128, help="most answers kept (default 3128, BLIP's VQAv2 list)")
    p.add_argument("--min-count", type=int, default=1, help="keep answers given at least this often (default 1)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args()
    if not args.annotations and not args.data:
        raise InputError("give --annotations (VQA annotations JSON) or --data (an MDS split), or several")
    if args.top < 1 or args.min_count < 1:
        raise InputError("--top and --min-count must be at least 1")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {out}: exists (pass --overwrite to replace it)")
    counts: Counter = Counter()
    questions = sum(count_annotation_answers(a, counts) for a in args.annotations)
    questions += sum(count_split_answers(d, counts) for d in args.data)
    answers = [a for a, c in counts.most_common() if c >= args.min_count][:args.top]
    if not answers:
        raise InputError("no answers found in the inputs")
    covered = sum(counts[a] for a in answers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(answers, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    summary = {"out": str(out), "answers": len(answers), "distinct_answers": len(counts), "questions": questions,
               "questions_covered": covered}
    print(f"answer_list: wrote {len(answers)} of {len(counts)} distinct answers to {out}; they answer "
          f"{covered} of {questions} questions ({covered / max(questions, 1):.1%})")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_tool(main)
