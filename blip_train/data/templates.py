"""Instruction templates for InstructBLIP: several phrasings per task, one drawn per training sample.

The phrasings live in `templates/instruct.json` (data, not code): `train[task]` is a list of
templates, `eval[task]` the one fixed instruction used for evaluation. A template's `{}` is replaced
by the sample's question; templates without `{}` (captioning) ignore it. Tasks come from the data's
`task` column (caption | vqa | vqa_short | conversation | visual_dialog); an unknown task is an
error that names the known ones, never a silent fallback.

Dataset balancing (sampling ∝ sqrt(size)) is not done here: it is `data.balance: sqrt`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Sequence

DEFAULT_TEMPLATES = Path(__file__).with_name("templates") / "instruct.json"


@dataclass(frozen=True)
class Templates:
    train: Mapping[str, Sequence[str]]
    """task -> phrasings drawn at random in training."""
    eval: Mapping[str, str]
    """task -> the fixed instruction used for evaluation."""

    @property
    def tasks(self) -> list[str]:
        return sorted(self.train)


def load_templates(path: str | Path = DEFAULT_TEMPLATES) -> Templates:
    """Read and check a templates JSON ({"train": {task: [str, ...]}, "eval": {task: str}})."""
    return _load_cached(str(Path(path).resolve()))


@lru_cache(maxsize=8)
def _load_cached(path: str) -> Templates:
    raw = json.loads(Path(path).read_text())
    train, evals = raw.get("train"), raw.get("eval", {})
    if not isinstance(train, dict) or not train:
        raise ValueError(f"{path}: needs a non-empty 'train' object of task -> list of templates")
    for task, phrasings in train.items():
        if not isinstance(phrasings, list) or not phrasings or not all(isinstance(t, str) for t in phrasings):
            raise ValueError(f"{path}: train[{task!r}] must be a non-empty list of strings")
        for t in phrasings:
            if t.count("{}") > 1:
                raise ValueError(f"{path}: template {t!r} has more than one '{{}}'")
    for task in evals:
        if task not in train:
            raise ValueError(f"{path}: eval[{task!r}] has no train templates")
    return Templates(train={k: tuple(v) for k, v in train.items()}, eval=dict(evals))


def question_templates(template: str, task: str = "vqa") -> Templates:
    """Templates of one fixed question template for `task`, in training and evaluation alike: BLIP-2's VQA
    prompt ("Question: {} Answer:"), which is not drawn from phrasings as InstructBLIP's instructions are."""
    if template.count("{}") != 1:
        raise ValueError(f"question template {template!r} must hold one '{{}}' for the question")
    return Templates(train={task: (template,)}, eval={task: template})


def _fill(template: str, question: str) -> str:
    # str.replace, not str.format: questions and templates may contain other braces.
    return template.replace("{}", question.strip()) if "{}" in template else template


def _task_templates(templates: Templates, task: str) -> Sequence[str]:
    if task not in templates.train:
        raise KeyError(f"no instruction templates for task {task!r} (known: {', '.join(templates.tasks)}); "
                       "add them to the templates JSON")
    return templates.train[task]


def choose_instruction(task: str, question: str, rng: random.Random,
                       templates: Optional[Templates] = None) -> str:
    """One training instruction for a sample: a template of `task` drawn uniformly with `rng`, filled
    with `question`. The same rng state gives the same choice (exactly one draw per call)."""
    templates = templates or load_templates()
    phrasings = _task_templates(templates, task)
    template = phrasings[rng.randrange(len(phrasings))]
    if "{}" in template and not question.strip():
        raise ValueError(f"task {task!r} template {template!r} needs a question, the sample has none")
    return _fill(template, question)


def eval_instruction(task: str, question: str, templates: Optional[Templates] = None) -> str:
    """The fixed evaluation instruction of `task` (the first train template when none is given)."""
    templates = templates or load_templates()
    template = templates.eval.get(task) or _task_templates(templates, task)[0]
    return _fill(template, question)
