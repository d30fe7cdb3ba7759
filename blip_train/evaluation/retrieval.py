"""Zero-shot image↔text retrieval: ITC similarity for all pairs, top-k re-ranked with ITM.

Score of a re-ranked pair = ITM positive logit + ITC similarity (the BLIP-2 evaluation rule); pairs
outside the top-k keep -inf so they rank below every re-ranked candidate. Several captions per image
are handled as COCO/Flickr: a text is correct for its own image; an image is answered correctly at K
when ANY of its captions is in the top K.
"""
from __future__ import annotations

from typing import Callable, Sequence

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
                       top: int = 5) -> dict[str, list[dict]]:
    """Per query: its ground truth, the rank of the first correct answer (`ranks`, from
    `first_correct_ranks` on the same scores), and the `top` answers with scores.

    Images and texts are named by their position in the split (texts in caption order, image by image).
    """
    tr_rank, ir_rank = ranks
    image_to_text = [{"image": i, "correct_texts": list(map(int, img2txt[i])), "rank": int(tr_rank[i]),
                      "top": [{"text": j, "caption": texts[j], "score": s} for j, s in _top(scores_i2t[i], top)]}
                     for i in range(scores_i2t.shape[0])]
    text_to_image = [{"text": t, "caption": texts[t], "correct_image": int(txt2img[t]), "rank": int(ir_rank[t]),
                      "top": [{"image": j, "score": s} for j, s in _top(scores_t2i[t], top)]}
                     for t in range(scores_t2i.shape[0])]
    return {"image_to_text": image_to_text, "text_to_image": text_to_image}


def rerank_with_itm(sim: torch.Tensor, k: int, itm_score: Callable[[int, torch.Tensor], torch.Tensor],
                    rows: Sequence[int] | None = None) -> torch.Tensor:
    """Re-rank each row's top-k columns: score = itm_score(row, cols) + sim[row, cols]; others -inf.

    `rows` restricts the work to a subset (a rank's shard); other rows stay -inf for the caller to merge.
    """
    out = torch.full_like(sim, float("-inf"))
    k = min(k, sim.shape[1])
    for r in (range(sim.shape[0]) if rows is None else rows):
        topk_sim, topk_idx = sim[r].topk(k)
        out[r, topk_idx] = itm_score(r, topk_idx).float() + topk_sim.float()
    return out


def chance_recall_at_1(num_images: int, num_texts: int, captions_per_image: float) -> dict[str, float]:
    """Expected R@1 of a random ranking, in percent (for the 'chance' entry of a summary)."""
    return {"txt_r1": 100.0 * min(1.0, captions_per_image / num_texts), "img_r1": 100.0 / num_images}
