"""VQA answer normalisation and accuracy; values derived by hand from the VQA evaluation rules.

The normalisation cases were also run through a transcription of the official VQA evaluation
functions (processPunctuation, processDigitArticle), which gives the same output for each.
"""
from __future__ import annotations

import pytest

from blip_train.evaluation.vqa_metrics import (answer_accuracy, exact_match, normalize_answer,
                                               vqa_accuracy)


# -------------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("raw,expected", [
    # articles go, case goes
    ("The Dog", "dog"), ("a cat and an apple", "cat and apple"), ("the", ""),
    # number words zero..ten (and "none") become digits; larger ones stay words
    ("two", "2"), ("Ten", "10"), ("zero", "0"), ("none", "0"), ("eleven", "eleven"),
    ("one of the two", "1 of 2"),
    # contractions missing an apostrophe are repaired; correct or ambiguous words are left alone
    ("dont", "don't"), ("isnt", "isn't"), ("cant", "can't"), ("wont", "won't"),
    ("oclock", "o'clock"),
    ("hed've", "he'd've"), ("he'dve", "he'd've"), ("yall", "y'all"), ("twas", "'twas"),
    ("don't", "don't"), ("its", "its"), ("lets", "lets"), ("im", "im"), ("were", "were"),
    # punctuation touching a space is deleted; elsewhere it becomes a space
    ("yes, it is", "yes it is"), ("red,white", "red white"), ("t-shirt", "t shirt"),
    ("t-shirt - blue", "tshirt blue"), ("(left)", "left"), ("what?", "what"), ("hi!", "hi"),
    ("a/b", "b"),                    # "/" -> space, then the article "a" is dropped
    ("@home", "home"), ("x_y", "x y"), ('"quoted"', "quoted"),
    # a comma between digits deletes every punctuation mark in the text, nowhere a space
    ("1,000", "1000"), ("1,000-2,000", "10002000"), ("red-white 1,5", "redwhite 15"),
    # a period goes unless a digit follows it
    ("yes.", "yes"), ("2.5", "2.5"), (".5", ".5"), ("5.", "5"), ("u.s.a.", "usa"), ("1.5.", "1.5"),
    # marks outside the official list survive
    ("it's", "it's"), ("10:30", "10:30"), ("$5", "$5"), ("50%", "50%"), ("#1", "#1"),
    # whitespace: newlines and tabs are spaces, runs collapse, ends are stripped
    ("  two\tdogs\n", "2 dogs"), ("", ""),
])
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# ------------------------------------------------------------------------------------- accuracy

def _ten_answers(matching: int) -> list[str]:
    return ["yes"] * matching + ["no"] * (10 - matching)


# With m matches among 10 answers, leaving out one of the m leaves m-1, leaving out one of the
# other 10-m leaves m: acc = (m·min(1,(m-1)/3) + (10-m)·min(1,m/3)) / 10.
#   m=1: (0 + 9/3)/10 = 0.3     m=2: (2/3 + 16/3)/10 = 0.6     m=3: (3·2/3 + 7)/10 = 0.9
#   m=4: (4 + 6)/10 = 1         m=0: 0
@pytest.mark.parametrize("matching,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                               (5, 1.0), (10, 1.0)])
def test_accuracy_by_number_of_agreeing_humans(matching: int, expected: float) -> None:
    assert answer_accuracy("yes", _ten_answers(matching)) == pytest.approx(expected, abs=1e-12)


def test_accuracy_with_fewer_answers() -> None:
    # 5 answers, 1 match: (1·0 + 4·(1/3)) / 5 = 4/15.
    assert answer_accuracy("yes", ["yes", "no", "no", "no", "no"]) == pytest.approx(4 / 15)
    with pytest.raises(ValueError, match="exact_match"):
        answer_accuracy("yes", ["yes"])


def test_vqa_accuracy_overall_per_type_and_per_question() -> None:
    answers = {
        1: _ten_answers(3),                                  # 0.9
        2: ["2"] * 4 + ["3"] * 6,                           # "Two." -> "2": 4 matches -> 1.0
        3: ["red"] * 10,                                    # "blue": 0
        4: ["the dog"] + ["cat"] * 9,                       # "a dog", "the dog" -> "dog": 0.3
    }
    predictions = {1: "yes", 2: "Two.", 3: "blue", 4: "a dog"}
    types = {1: "yes/no", 2: "number", 3: "other", 4: "other"}
    out = vqa_accuracy(predictions, answers, types)
    assert out["per_question"] == pytest.approx({1: 90.0, 2: 100.0, 3: 0.0, 4: 30.0})
    assert out["overall"] == pytest.approx((90 + 100 + 0 + 30) / 4)
    # per-type means are over the questions of the type, not weighted by anything else
    assert out["per_type"] == pytest.approx({"yes/no": 90.0, "number": 100.0, "other": 15.0})


def test_vqa_accuracy_without_types() -> None:
    out = vqa_accuracy({"q": "Yes"}, {"q": _ten_answers(2)})
    assert out["overall"] == pytest.approx(60.0)
    assert out["per_type"] == {}


def test_vqa_accuracy_input_checks() -> None:
    with pytest.raises(ValueError, match="missing predictions for \\['b'\\]"):
        vqa_accuracy({"a": "yes"}, {"a": _ten_answers(1), "b": _ten_answers(1)})
    with pytest.raises(ValueError, match="no answers for \\['c'\\]"):
        vqa_accuracy({"a": "yes", "c": "no"}, {"a": _ten_answers(1)})
    with pytest.raises(ValueError, match="question_types lacks"):
        vqa_accuracy({"a": "yes"}, {"a": _ten_answers(1)}, {"z": "other"})


# ---------------------------------------------------------------------------------- exact match

def test_exact_match() -> None:
    answers = {1: "the red car", 2: ["2", "two cats"], 3: "left", 4: "Yes"}
    predictions = {1: "Red car.", 2: "two", 3: "right", 4: "yes"}
    out = exact_match(predictions, answers)
    assert out["per_question"] == {1: 100.0, 2: 100.0, 3: 0.0, 4: 100.0}
    assert out["overall"] == pytest.approx(75.0)
    raw = exact_match(predictions, answers, normalize=False)
    assert raw["per_question"] == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}
    with pytest.raises(ValueError, match="missing predictions"):
        exact_match({}, {1: "x"})


def test_one_human_answer_is_scored_right_or_wrong() -> None:
    """GQA / video QA questions have one answer: a correct prediction scores 100 (the VQA formula would cap it at
    a third), a wrong one 0; questions with several answers keep the VQA formula."""
    from blip_train.evaluation.vqa_metrics import vqa_score

    answers = {1: ["left"], 2: ["Red"], 3: ["two"] * 2 + ["three"] * 8}
    scores = vqa_score({1: "left", 2: "blue", 3: "two"}, answers)["per_question"]
    assert scores[1] == 100.0 and scores[2] == 0.0
    assert scores[3] == pytest.approx(vqa_accuracy({3: "two"}, {3: answers[3]})["overall"])
