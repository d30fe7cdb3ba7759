"""Caption tokenisation, CIDEr-D and BLEU against numbers recorded from the reference pipeline.

Every expected value marked "reference" was produced by pycocoevalcap 1.2 (PTBTokenizer running
Stanford CoreNLP 3.4.1 under OpenJDK 17, then Bleu(4) and Cider()) on exactly the inputs below, in
a separate environment; pycocoevalcap is not a dependency of this project. The other values are
derived by hand in the comments next to them.
"""
from __future__ import annotations

import math

import pytest

from blip_train.evaluation.caption_metrics import bleu, caption_metrics, cider_d
from blip_train.evaluation.ptb_tokenize import ptb_tokenize

# ------------------------------------------------------------------------------------ tokenisation

# (raw caption, reference tokenisation): outputs of pycocoevalcap's PTBTokenizer.
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs (a black one and a white one) play in the park.",
     "two dogs -lrb- a black one and a white one -rrb- play in the park"),
    ("The man's hat isn't red; it's blue!", "the man 's hat is n't red it 's blue"),
    ('"Look at that," she said -- pointing.', "look at that she said pointing"),
    ("A black-and-white photo of a 1950s car... very old.",
     "a black-and-white photo of a 1950s car very old"),
    ("Kids don't wanna go to Mr. Smith's house at 3:30 p.m.",
     "kids do n't wan na go to mr. smith 's house at 3:30 p.m."),
    ("A cat/dog sitting on a couch * with $5.50 & 10% off.",
     "a cat/dog sitting on a couch * with $ 5.50 & 10 % off"),
    ("He said 'hello' to the U.S. team, e.g. the players.",
     "he said hello to the u.s. team e.g. the players"),
    ("A sign reads {STOP} and [YIELD]?", "a sign reads -lcb- stop -rcb- and -lsb- yield -rsb-"),
    ("It costs 3,000 dollars, 2.5 million in total.",
     "it costs 3,000 dollars 2.5 million in total"),
    ("We'll go; they'd come; I'm here; you've seen; cannot gonna",
     "we 'll go they 'd come i 'm here you 've seen can not gon na"),
    ("A man \u2019s face with \u201csmart quotes\u201d and an em\u2014dash",
     "a man 's face with smart quotes and an em dash"),
    ("  leading and   multiple    spaces ", "leading and multiple spaces"),
    ("Hello.World and e-mail @user #tag", "hello.world and e-mail @user #tag"),
    ("can't won't shan't ain't y'all 'tis", "ca n't wo n't sha n't ai n't y' all 't is"),
    ("The 2nd floor, 3rd-place winner's trophies'", "the 2nd floor 3rd-place winner 's trophies"),
    ("50's era car at the 1990s... ok..", "50 's era car at the 1990s ok"),
    ("a b.c d. e", "a b.c d. e"),
    ("a 'quoted' word and 'em", "a quoted word and 'em"),
    (".5 and 0.5 and 1. and 1.5.", ".5 and 0.5 and 1 and 1.5"),
    ("x+y = z < w > v ~ t ^ s | r", "x + y = z < w > v ~ t ^ s | r"),
    ("an en\u2013dash and an ellipsis\u2026 here", "an en dash and an ellipsis here"),
    ("o'clock o'neil rock'n'roll mcdonald's dogs' bone",
     "o'clock o'neil rock 'n' roll mcdonald 's dogs bone"),
    ("it's 'cause i'd've seen", "it 's 'cause i 'd 've seen"),
    ("The girls' dresses and James' car.", "the girls dresses and james car"),
    ("a--b and a - b and a -- b", "a b and a b and a b"),
    ("US$ 5 and 5$ and \u20ac5 and \u00a35", "us$ 5 and 5 $ and $ 5 and # 5"),
    ("hello!!! what?? no!?", "hello !!! what ?? no !?"),
    ("a 4x4 and 3d and 2-3 and 1/2 and 10:00am and 5pm",
     "a 4x4 and 3d and 2-3 and 1/2 and 10:00 am and 5pm"),
    ("MR. SMITH and Mr Smith and mrs. jones and ms. lee",
     "mr. smith and mr smith and mrs. jones and ms. lee"),
    ("cheeseburgers,fries and drinks.", "cheeseburgers fries and drinks"),
    ("a&b and -word and word- and a -b", "a & b and word and word and a b"),
    ("it's. don't. 50%. ok.. wow.... yes,,no", "it 's do n't 50 % ok wow yes no"),
    ("a. b and A. B and x. y", "a. b and a. b and x. y"),
    ("st. louis vs. inc. no. 5 jr. approx. fig. sat. sq. tv. a.m. u.s.a. ph.d.",
     "st. louis vs. inc. no. 5 jr. approx fig sat sq. tv a.m. u.s.a. ph.d."),
    ("2-year-old 10-15 3.5-inch a:b 1:2 12:30:45", "2-year-old 10-15 3.5-inch a b 1:2 12:30:45"),
    (",leading comma and .leading period", "leading comma and leading period"),
    ("A bowl of fruit containing apples, oranges, bananas, etc.",
     "a bowl of fruit containing apples oranges bananas etc."),
    ("a computer desk with two monitors , a keyboard and a mouse .",
     "a computer desk with two monitors a keyboard and a mouse"),
    ("It's a black and white photo of an old car from the 1920's.",
     "it 's a black and white photo of an old car from the 1920 's"),
    ("", ""),
]


@pytest.mark.parametrize("raw,expected", PTB_CASES)
def test_ptb_tokenize_matches_reference_pipeline(raw: str, expected: str) -> None:
    assert ptb_tokenize(raw) == expected


# --------------------------------------------------------------- end to end on raw captions (ref)

RAW_PREDS = {
    1: "A man riding a wave on top of a surfboard.",
    2: "a dog sitting on a couch",
    3: "Two giraffes standing in a field.",
    4: "a plate of food with broccoli and broccoli",
    5: "A woman's hand holding a cell phone",
}
RAW_REFS = {
    1: ["A man riding a wave on a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave!", "Man surfing on top of a big wave."],
    2: ["A dog laying on a couch.", "A small brown dog sits on the sofa.",
        "The dog is resting on a couch, looking at the camera."],
    3: ["Two giraffes standing next to each other in a field.",
        "A pair of giraffes in a grassy field.",
        "Two giraffes (one tall, one short) stand in the grass."],
    4: ["A close up of a plate of food with broccoli.",
        "A white plate topped with meat and broccoli.",
        "Broccoli, rice and chicken on a plate."],
    5: ["A woman's hand is holding a cell phone.", "Someone's hand holding a black phone.",
        "A person holds a smartphone in their hand; it's on."],
}
REF_CIDER = 2.78831412801338
REF_CIDER_PER_ID = {1: 3.3831945821794127, 2: 1.8646298001887085, 3: 1.8612397981244035,
                    4: 2.9169910491481494, 5: 3.9155154104262264}
REF_BLEU = [0.9473684210027701, 0.9124340442336144, 0.8266712688825284, 0.7039919188939444]
TOL = 1e-9


def test_raw_captions_match_reference() -> None:
    score, per_id = cider_d(RAW_PREDS, RAW_REFS)
    assert score == pytest.approx(REF_CIDER, abs=TOL)
    assert per_id == pytest.approx(REF_CIDER_PER_ID, abs=TOL)
    b = bleu(RAW_PREDS, RAW_REFS)
    assert [b[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(REF_BLEU, abs=TOL)
    combined = caption_metrics(RAW_PREDS, RAW_REFS)
    assert combined == pytest.approx({"cider": REF_CIDER, **b}, abs=TOL)


# ------------------------------------------------------------ pre-tokenised edge cases (reference)

EDGE_REFS = {"a": ["a man riding a horse", "a person on a horse in a field",
                   "a man rides a brown horse"],
             "b": ["a cat on a bed", "a cat sleeping on a bed", "a black cat lying on a bed"],
             "c": ["a red bus on the street", "a double decker bus", "a bus driving down a road"]}
# name: (predictions, reference CIDEr per id, reference BLEU-1..4)
EDGE_CASES = {
    "empty_prediction": (
        {"a": "", "b": "a cat on a bed", "c": "a red bus on the street"},
        {"a": 0.0, "b": 5.7131689745806105, "c": 3.7692291475065813},
        [0.6347364188248755, 0.634736418818464, 0.6347364188096101, 0.6347364187961154]),
    "prediction_equals_a_reference": (
        {"a": "a man riding a horse", "b": "a cat on a bed", "c": "a bus driving down a road"},
        {"a": 4.352327331382719, "b": 5.7131689745806105, "c": 3.7692291475065813},
        [0.999999999875, 0.9999999998677885, 0.9999999998576924, 0.99999999984193]),
    "one_word": (
        {"a": "horse", "b": "cat", "c": "bus"},
        {"a": 0.8906649186476079, "b": 1.0645464590433622, "c": 1.0134650851032863},
        [0.025561533189466423, 2.5561533193726673e-05, 2.556153319514677e-06,
         8.083266538491039e-07]),
    "repeated_words_are_clipped": (
        {"a": "horse horse horse horse horse", "b": "a cat a cat a cat on a bed", "c": "bus bus"},
        {"a": 0.2519503798089802, "b": 2.3193857107796862, "c": 0.5612030653885852},
        [0.4374999999453126, 0.3668996928041631, 0.3430878330976569, 0.31698520316837203]),
    "long_prediction": (
        {"a": "a man riding a horse in a field with trees and a fence and a barn in the background",
         "b": "cat", "c": "a red double decker bus driving down a street in a city"},
        {"a": 0.3077322230048718, "b": 1.0645464590433622, "c": 1.4288432559549085},
        [0.562499999982422, 0.5021505475424858, 0.43804178713739556, 0.3600759834485005]),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_reference(name: str) -> None:
    preds, ref_cider, ref_bleu = EDGE_CASES[name]
    score, per_id = cider_d(preds, EDGE_REFS, tokenize=False)
    assert per_id == pytest.approx(ref_cider, abs=TOL)
    assert score == pytest.approx(sum(ref_cider.values()) / 3, abs=TOL)
    b = bleu(preds, EDGE_REFS, tokenize=False)
    assert [b[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(ref_bleu, abs=TOL)


def test_prediction_identical_to_all_references() -> None:
    refs = {"x": ["a dog on a sofa"] * 3, "y": ["two cats playing"] * 3, "z": ["a tall tree"] * 3}
    preds = {k: v[0] for k, v in refs.items()}
    score, per_id = cider_d(preds, refs, tokenize=False)
    # Identical vectors: cosine 1 for every order that has n-grams, no length penalty, ×10. A
    # 3-word caption has no 4-grams, so that term is 0 and the mean over n = 1..4 is 3/4.
    assert per_id == pytest.approx({"x": 10.0, "y": 7.5, "z": 7.5}, abs=TOL)
    assert score == pytest.approx(25.0 / 3, abs=TOL)                     # reference: 8.3333...
    # BLEU: every precision is (c + 1e-15) / (c + 1e-9), just below 1; reference values.
    b = bleu(preds, refs, tokenize=False)
    assert [b[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(
        [0.999999999818182, 0.9999999998011365, 0.9999999997704547, 0.9999999996801139], abs=TOL)


# ------------------------------------------------------------------------- hand-derived properties

def test_single_image_cider_is_zero() -> None:
    # One document: idf = log(1) - log(1) = 0 for every reference n-gram, so every weight is 0.
    score, per_id = cider_d({0: "a cat on a mat"}, {0: ["a cat on a mat"]}, tokenize=False)
    assert score == 0.0 and per_id == {0: 0.0}


def test_cider_length_penalty() -> None:
    # Two images; the candidate of image 0 shares only "cat" with its reference, which image 1's
    # reference lacks, so idf("cat") = log 2 and every higher-order term is 0.
    # Candidate "cat" (0 bigrams) vs reference "cat sat down" (2 bigrams): cosine of 1-gram
    # vectors (log2) · (log2) / (log2 · sqrt(3 · log²2)) = 1/sqrt(3); penalty exp(-4 / 72).
    refs = {0: ["cat sat down"], 1: ["dog ran off"]}
    _, per_id = cider_d({0: "cat", 1: "dog ran off"}, refs, tokenize=False)
    expected = 10 * (1 / math.sqrt(3)) * math.exp(-4 / 72) / 4
    assert per_id[0] == pytest.approx(expected, abs=1e-12)


def test_bleu_brevity_penalty_by_hand() -> None:
    # "the cat" vs "the cat sat": p1 = 2/2, p2 = 1/1, c = 2 < r = 3 -> BP = exp(1 - 3/2).
    b = bleu({0: "the cat"}, {0: ["the cat sat"]}, n=2, tokenize=False)
    assert b["bleu_1"] == pytest.approx(math.exp(-0.5), abs=1e-9)
    assert b["bleu_2"] == pytest.approx(math.exp(-0.5), abs=1e-9)
    assert set(b) == {"bleu_1", "bleu_2"}


def test_bleu_uses_closest_reference_length() -> None:
    # Candidate of 4 words, references of 2 and 5 words: 5 is closer (|5-4| = 1 < 2) so the
    # brevity penalty is exp(1 - 5/4); precision 1 for unigrams ("a b c d" all in the 5-word ref).
    b = bleu({0: "a b c d"}, {0: ["a b", "a b c d e"]}, n=1, tokenize=False)
    assert b["bleu_1"] == pytest.approx(math.exp(1 - 5 / 4), abs=1e-9)
    # A tie (3 and 5 around 4) takes the shorter: no penalty since 4 >= 3.
    b = bleu({0: "a b c d"}, {0: ["a b c", "a b c d e"]}, n=1, tokenize=False)
    assert b["bleu_1"] == pytest.approx(1.0, abs=1e-9)


def test_tokenize_flag_changes_ngrams() -> None:
    preds, refs = {0: "A Cat.", 1: "dog"}, {0: ["a cat"], 1: ["dog"]}
    assert bleu(preds, refs)["bleu_1"] == pytest.approx(1.0, abs=1e-9)
    assert bleu(preds, refs, tokenize=False)["bleu_1"] < 0.5          # "A", "Cat." do not match


# ---------------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("fn", [cider_d, bleu, caption_metrics])
def test_mismatched_ids_are_refused(fn) -> None:
    with pytest.raises(ValueError, match="missing predictions for \\[2\\]"):
        fn({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]})
    with pytest.raises(ValueError, match="no references for \\[3\\]"):
        fn({1: "a cat", 3: "x"}, {1: ["a cat"]})


def test_empty_reference_list_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d({1: "a cat"}, {1: []})
