"""Retrieval scoring on constructed score matrices with hand-computed ranks.

3 images with 2 captions each (texts 0-1 describe image 0, 2-3 image 1, 4-5 image 2), COCO-style:
a text is correct only for its image; an image is correct at K when ANY of its captions is in its top K.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blip_train.evaluation.retrieval import (chance_recall_at_1, first_correct_ranks, ranked_predictions,
                                             recall_metrics, reranked_scores, rerank_pairs)

IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]
TEXTS = [f"caption {t}" for t in range(6)]

# image -> text scores. Image 0: its caption 1 ranks first. Image 1: its captions rank 3rd and 4th
# (texts 0, 4 beat them). Image 2: its caption 5 ranks 2nd (after text 0).
I2T = np.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],
                 [0.8, 0.0, 0.5, 0.4, 0.7, 0.0],
                 [0.9, 0.0, 0.0, 0.0, 0.1, 0.6]])
# text -> image scores. Texts 0, 2, 5 find their image first; text 1 second; text 3 third; text 4 second.
T2I = np.array([[0.9, 0.1, 0.0],
                [0.8, 0.0, 0.9],
                [0.0, 0.9, 0.1],
                [0.5, 0.1, 0.9],
                [0.0, 0.9, 0.5],
                [0.0, 0.0, 0.9]])


def test_first_correct_ranks_by_hand():
    tr, ir = first_correct_ranks(I2T, T2I, IMG2TXT, TXT2IMG)
    assert tr.tolist() == [0, 2, 1]
    assert ir.tolist() == [0, 1, 0, 2, 1, 0]


def test_recall_metrics_by_hand():
    m = recall_metrics(I2T, T2I, IMG2TXT, TXT2IMG, ks=(1, 2, 3))
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r2"] == pytest.approx(200 / 3)
    assert m["txt_r3"] == 100.0
    assert m["img_r1"] == pytest.approx(50.0) and m["img_r2"] == pytest.approx(500 / 6) and m["img_r3"] == 100.0
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_ties_keep_index_order():
    # all scores equal: the stable order puts index 0 first, so only image 0 / texts of image 0 hit at 1
    m = recall_metrics(np.zeros((3, 6)), np.zeros((6, 3)), IMG2TXT, TXT2IMG, ks=(1,))
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["img_r1"] == pytest.approx(100 / 3)


def test_rerank_scores_only_the_top_k_with_itm_plus_itc():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0],
                        [0.0, 0.2, 0.3, 0.4]])
    # top-2 texts of image 0: 0, 1; of image 1: 3, 2. Top-2 images of each text: both images.
    pairs = rerank_pairs(sim, 2)
    assert pairs.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    pairs = rerank_pairs(sim, 1)  # image 0: text 0; image 1: text 3; texts 0,1 -> image 0; 2,3 -> image 1
    assert pairs.tolist() == [0, 1, 6, 7]
    itm = np.array([10.0, 20.0, 30.0, 40.0])  # the ITM logit of each pair, once for both directions
    i2t, t2i = reranked_scores(sim, 1, pairs, itm)
    assert i2t[0].tolist() == pytest.approx([10.9, float("-inf"), float("-inf"), float("-inf")])
    assert i2t[1].tolist() == pytest.approx([float("-inf"), float("-inf"), float("-inf"), 40.4])
    inf = float("-inf")
    np.testing.assert_allclose(t2i, [[10.9, inf], [20.8, inf], [inf, 30.3], [inf, 40.4]], rtol=1e-6)
    with pytest.raises(ValueError, match="lacks a re-ranked pair"):
        reranked_scores(sim, 2, pairs, itm)  # k=2 re-ranks pairs that were not scored


def test_predictions_agree_with_the_recalls_and_are_strict_json():
    scores = I2T.copy()
    scores[0, 2:] = -np.inf  # outside the re-ranked top-k
    tr, ir = first_correct_ranks(scores, T2I, IMG2TXT, TXT2IMG)
    p = ranked_predictions(scores, T2I, IMG2TXT, TXT2IMG, TEXTS, (tr, ir), top=3)
    assert [q["rank"] for q in p["image_to_text"]] == tr.tolist()
    assert [q["rank"] for q in p["text_to_image"]] == ir.tolist()
    first = p["image_to_text"][1]
    assert first["correct_texts"] == [2, 3]
    assert [(a["text"], a["caption"]) for a in first["top"]] == [(0, "caption 0"), (4, "caption 4"), (2, "caption 2")]
    assert p["image_to_text"][0]["top"][2]["score"] is None  # -inf is not JSON
    t3 = p["text_to_image"][3]
    assert t3["caption"] == "caption 3" and t3["correct_image"] == 1
    assert [a["image"] for a in t3["top"]] == [2, 0, 1]
    json.dumps(p, allow_nan=False)


def test_chance_recall():
    c = chance_recall_at_1(num_images=3, num_texts=6, captions_per_image=2)
    assert c == {"txt_r1": pytest.approx(100 / 3), "img_r1": pytest.approx(100 / 3)}
