"""Zero-shot image↔text retrieval: ITC similarity for all pairs, top-k re-ranked with ITM.

Score of a re-ranked pair = ITM positive logit + ITC similarity (the BLIP-2 evaluation rule); pairs
outside the top-k keep -inf so they rank below every re-ranked candidate. Several captions per image
are handled as COCO/Flickr: a text is correct for its own image; an image is answered correctly at K
when ANY of its captions is in the top K.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def first_correct_ranks(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: Sequence[Sequence[int]],
                        txt2img: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of the first correct answer per image (over texts) and per text (over images).

    Ties keep index order (stable sort), so the ranks, the recalls and the saved predictions agree.
    """
    ni = scores_i2t.shape[0]
    tr_rank = np.empty(ni, dtype=np.int64)
    for i in range(ni):
        order = np.argsort(-scores_i2t[i], kind="stable")
        tr_rank[i] = np.where(np.isin(order, np.asarray(img2txt[i])))[0].min()
    nt = scores_t2i.shape[0]
    ir_rank = np.empty(nt, dtype=np.int64)
    for t in range(nt):
        order = np.argsort(-scores_t2i[t], kind="stable")
        ir_rank[t] = np.where(order == txt2img[t])[0][0]
    return tr_rank, ir_rank


def recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: Sequence[Sequence[int]],
                   txt2img: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """TR@K / IR@K in percent from score matrices (Ni, Nt) and (Nt, Ni)."""
    return recall_from_ranks(*first_correct_ranks(scores_i2t, scores_t2i, img2txt, txt2img), ks=ks)


def recall_from_ranks(tr_rank: np.ndarray, ir_rank: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """TR@K / IR@K in percent from `first_correct_ranks`."""
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float(np.mean(tr_rank < k))
        out[f"img_r{k}"] = 100.0 * float(np.mean(ir_rank < k))
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def _top(scores: np.ndarray, n: int) -> list[tuple[int, float | None]]:
    order = np.argsort(-scores, kind="stable")[:n]
    # pairs outside the re-ranked top-k score -inf, which JSON cannot hold
    return [(int(j), float(scores[j]) if np.isfinite(scores[j]) else None) for j in order]


def ranked_predictions(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: Sequence[Sequence[int]],
                       txt2img: Sequence[int], texts: Sequence[str], ranks: tuple[np.ndarray, np.ndarray],
                       top: int = 5, image_ids: Sequence[int] | None = None) -> dict[str, list[dict]]:
    """Per query: its ground truth, the rank of the first correct answer (`ranks`, from
    `first_correct_ranks` on the same scores), and the `top` answers with scores.

    Images and texts are named by their position in the evaluation (texts in caption order, image by
    image); with `image_ids` (the dataset's id of each image) every image also carries its `image_id`.
    """
    tr_rank, ir_rank = ranks

    def image(i: int, key: str = "image") -> dict:
        return {key: i} if image_ids is None else {key: i, "image_id": int(image_ids[i])}

    image_to_text = [{**image(i), "correct_texts": list(map(int, img2txt[i])), "rank": int(tr_rank[i]),
                      "top": [{"text": j, "caption": texts[j], "score": s} for j, s in _top(scores_i2t[i], top)]}
                     for i in range(scores_i2t.shape[0])]
    text_to_image = [{"text": t, "caption": texts[t], **image(int(txt2img[t]), "correct_image"),
                      "rank": int(ir_rank[t]),
                      "top": [{**image(j), "score": s} for j, s in _top(scores_t2i[t], top)]}
                     for t in range(scores_t2i.shape[0])]
    return {"image_to_text": image_to_text, "text_to_image": text_to_image}


def top_k_candidates(sim: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top texts per image (Ni, k), top images per text (Nt, k)) by ITC similarity `sim` (Ni, Nt)."""
    ni, nt = sim.shape
    return sim.topk(min(k, nt), dim=1).indices.numpy(), sim.t().topk(min(k, ni), dim=1).indices.numpy()


def rerank_pairs(sim: torch.Tensor, k: int) -> np.ndarray:
    """The (image, text) pairs that ITM re-ranks, as sorted unique codes image * Nt + text: each image's
    top-k texts and each text's top-k images.

    A pair in both directions is scored once: its ITM logit is the same function of (image, text).
    """
    ni, nt = sim.shape
    top_texts, top_images = top_k_candidates(sim, k)
    i2t = np.arange(ni)[:, None] * nt + top_texts                                    # (Ni, k)
    t2i = top_images * nt + np.arange(nt)[:, None]                                   # (Nt, k)
    return np.unique(np.concatenate([i2t.ravel(), t2i.ravel()]))


def reranked_scores(sim: torch.Tensor, k: int, pairs: np.ndarray,
                    pair_itm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores_i2t (Ni, Nt), scores_t2i (Nt, Ni)): each row's top-k scores ITM logit + ITC similarity,
    every other entry -inf (ranked below all of them). `pairs` from `rerank_pairs`, `pair_itm` (P,) their
    ITM logits."""
    ni, nt = sim.shape
    sim_np = sim.float().numpy()
    itm = np.asarray(pair_itm, dtype=np.float32)

    def fill(images: np.ndarray, texts: np.ndarray, cols: np.ndarray, width: int) -> np.ndarray:
        codes = images * nt + texts                                                  # (R, k)
        pos = np.minimum(np.searchsorted(pairs, codes), len(pairs) - 1)
        if not np.array_equal(pairs[pos], codes):
            raise ValueError("pair_itm lacks a re-ranked pair (pairs must come from rerank_pairs on this sim)")
        out = np.full((codes.shape[0], width), -np.inf, dtype=np.float32)
        np.put_along_axis(out, cols, itm[pos] + sim_np[images, texts], axis=1)
        return out

    top_texts, top_images = top_k_candidates(sim, k)
    rows_i, rows_t = np.arange(ni)[:, None], np.arange(nt)[:, None]
    scores_i2t = fill(np.broadcast_to(rows_i, top_texts.shape), top_texts, top_texts, nt)
    scores_t2i = fill(top_images, np.broadcast_to(rows_t, top_images.shape), top_images, ni)
    return scores_i2t, scores_t2i


def chance_recall_at_1(num_images: int, num_texts: int, captions_per_image: float) -> dict[str, float]:
    """Expected R@1 of a random ranking, in percent (for the 'chance' entry of a summary)."""
    return {"txt_r1": 100.0 * min(1.0, captions_per_image / num_texts), "img_r1": 100.0 / num_images}
