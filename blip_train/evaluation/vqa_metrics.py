"""VQA accuracy with the answer normalisation of the official VQA evaluation, and exact match.

VQA accuracy (Antol et al. 2015; VQA v2 evaluation): a predicted answer is fully right when at
least 3 of the human answers agree with it. To smooth over annotator noise the official score
averages min(#matches / 3, 1) over the leave-one-out subsets of the (usually 10) human answers, so
with 10 answers and m matches the score is 0, 0.3, 0.6, 0.9, 1.0 for m = 0, 1, 2, 3, >=4.

Normalisation, in the official order:
1. newlines and tabs become spaces, surrounding whitespace goes;
2. punctuation (`_PUNCTUATION`) is deleted where it touches a space or where the text holds a
   digit-comma-digit ("1,000" -> "1000"), and replaced by a space elsewhere
   ("t-shirt" -> "t shirt");
   a period is deleted unless a digit follows it ("2.5" stays);
3. lowercase, split into words; number words zero..ten (and "none") become digits; the articles
   a / an / the are dropped; contractions missing their apostrophe are repaired ("dont" -> "don't").

One deliberate difference: the official script applies step 3 only to the prediction and step 2 to
the human answers only when they are not unanimous, relying on the released annotations being
normalised already. We normalise both sides in full, which gives the same result on those
annotations and the intended one on datasets converted from elsewhere.
"""
from __future__ import annotations

import re
from typing import Hashable, Mapping, Sequence

# Characters the official evaluation treats as punctuation. Apostrophes, colons, periods (handled
# separately) and currency/percent signs are not in it.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern is meant to skip periods between digits; as written it only looks ahead,
# so a period is kept exactly when a digit follows it ("2.5", ".5"; but "5." loses its period).
_PERIOD = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions in their correct spelling. The official table maps every spelling with exactly one
# apostrophe missing onto these ("dont" -> "don't"; "hed've", "he'dve" -> "he'd've"), which is how
# `_CONTRACTIONS` is built below. Absent on purpose, as in the official table's effect: "lets",
# "shes", "its", "wed", "ill", "well", "were", "im", "ive" (ordinary words, or keys that the
# official table spells with a capital I and so never match lowercased text).
_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've there're
there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're
you've
""".split()


def _one_apostrophe_dropped(form: str) -> list[str]:
    """Every spelling of `form` with exactly one of its apostrophes removed."""
    return [form[:i] + form[i + 1:] for i, ch in enumerate(form) if ch == "'"]


_CONTRACTIONS = {typo: form for form in _CONTRACTED_FORMS for typo in _one_apostrophe_dropped(form)}


def _strip_punctuation(text: str) -> str:
    """Step 2 of the normalisation. Conditions are tested on the input text, as officially."""
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (see the module docstring).

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    """
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def answer_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one normalised prediction against normalised human answers.

    Mean over the leave-one-out subsets of min(#matches in the subset / 3, 1).
    """
    if len(human_answers) < 2:
        raise ValueError("VQA accuracy needs at least 2 human answers (it leaves one out); "
                         "use exact_match for single-reference tasks")
    matches = sum(a == prediction for a in human_answers)
    # Leaving out a matching answer leaves matches-1 in the subset, leaving out another leaves all.
    n = len(human_answers)
    return (matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)) / n


def _check_ids(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, object]) -> None:
    """The official evaluation refuses a result file that does not cover the question set."""
    missing = [k for k in answers if k not in predictions]
    extra = [k for k in predictions if k not in answers]
    if missing or extra:
        raise ValueError(f"predictions and answers must have the same question ids; missing "
                         f"predictions for {missing[:5]}, no answers for {extra[:5]}")
    if not answers:
        raise ValueError("no questions to score")


def vqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]],
                 question_types: Mapping[Hashable, str] | None = None) -> dict[str, object]:
    """VQA accuracy in percent.

    Returns {"overall": %, "per_type": {type: %}, "per_question": {qid: %}}; "per_type" averages
    over the questions of each type (e.g. answer types "yes/no", "number", "other") and is empty
    when `question_types` is None. Values are not rounded (the official script rounds to 2 decimals
    for display only).
    """
    _check_ids(predictions, answers)
    if question_types is not None:
        untyped = [k for k in answers if k not in question_types]
        if untyped:
            raise ValueError(f"question_types lacks question ids {untyped[:5]}")
    per_question: dict[Hashable, float] = {}
    by_type: dict[str, list[float]] = {}
    for qid, human in answers.items():
        acc = 100.0 * answer_accuracy(normalize_answer(predictions[qid]),
                                      [normalize_answer(a) for a in human])
        per_question[qid] = acc
        if question_types is not None:
            by_type.setdefault(question_types[qid], []).append(acc)
    return {"overall": sum(per_question.values()) / len(per_question),
            "per_type": {t: sum(v) / len(v) for t, v in by_type.items()},
            "per_question": per_question}


def exact_match(predictions: Mapping[Hashable, str],
                answers: Mapping[Hashable, str | Sequence[str]],
                normalize: bool = True) -> dict[str, object]:
    """Exact-match accuracy in percent for short-answer tasks with one (or a few) gold answers.

    A prediction scores 100 when it equals any gold answer after `normalize_answer` (or verbatim,
    with `normalize=False`). Returns {"overall": %, "per_question": {qid: 0 or 100}}.
    """
    _check_ids(predictions, answers)
    norm = normalize_answer if normalize else (lambda s: s)
    per_question: dict[Hashable, float] = {}
    for qid, gold in answers.items():
        golds = [gold] if isinstance(gold, str) else list(gold)
        per_question[qid] = 100.0 if norm(predictions[qid]) in {norm(g) for g in golds} else 0.0
    return {"overall": sum(per_question.values()) / len(per_question), "per_question": per_question}


def vqa_score(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]]) -> dict[str, object]:
    """VQA accuracy where the human answers allow it, exact match where they do not, in percent.

    The VQA formula (min(#humans agreeing / 3, 1), averaged over the leave-one-out subsets) presumes several
    annotators; a question with one human answer (GQA, Visual Genome, MSVD-QA / MSRVTT-QA, most video and
    generated QA) is right or wrong: 100 when the normalised prediction equals it, as those benchmarks report.
    Returns {"overall": %, "per_question": {qid: %}}."""
    many = {q: a for q, a in answers.items() if len(a) >= 2}
    one = {q: a for q, a in answers.items() if len(a) < 2}
    per_question: dict[Hashable, float] = {}
    if many:
        per_question.update(vqa_accuracy({q: predictions[q] for q in many}, many)["per_question"])
    if one:
        per_question.update(exact_match({q: predictions[q] for q in one}, one)["per_question"])
    return {"overall": sum(per_question.values()) / max(len(per_question), 1), "per_question": per_question}
