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


def recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: Sequence[Sequence[int]],
                   txt2img: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """TR@K / IR@K in percent from score matrices (Ni, Nt) and (Nt, Ni)."""
    ni, nt = scores_i2t.shape
    tr_rank = np.empty(ni)
    for i in range(ni):
        order = np.argsort(-scores_i2t[i], kind="stable")
        pos = np.where(np.isin(order, np.asarray(img2txt[i])))[0]
        tr_rank[i] = pos.min()
    ir_rank = np.empty(nt)
    for t in range(nt):
        order = np.argsort(-scores_t2i[t], kind="stable")
        ir_rank[t] = np.where(order == txt2img[t])[0][0]
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float(np.mean(tr_rank < k))
        out[f"img_r{k}"] = 100.0 * float(np.mean(ir_rank < k))
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


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
