"""Retrieval evaluation of a stage-1 model on an MDS split (sharded over ranks, results gathered)."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from streaming import StreamingDataset

from blip_train.data.collate import pre_caption
from blip_train.data.schema import verify_split
from blip_train.data.transforms import build_transform
from blip_train.evaluation.retrieval import (chance_recall_at_1, first_correct_ranks, ranked_predictions,
                                             recall_from_ranks, recall_metrics, rerank_with_itm)


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_objects(obj, world: int) -> list:
    """Every rank's `obj` in rank order (just [obj] when the work was not sharded)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def load_retrieval_split(split: str, max_samples: int = 0) -> tuple[list[bytes], list[list[str]]]:
    """Images (encoded) and their reference captions, in split order."""
    verify_split(split)
    ds = StreamingDataset(local=split, shuffle=False, batch_size=1)
    total = ds.num_samples  # len(ds) is only this rank's share when a process group exists
    n = total if not max_samples else min(max_samples, total)
    images, captions = [], []
    for i in range(n):
        row = ds[i]
        images.append(row["image"])
        refs = list(row["captions"]) or [row["caption"]]
        captions.append([c for c in refs if c])
    return images, captions


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, split: str, image_size: int, max_txt_len: int, k_test: int = 128,
                       batch_size: int = 64, max_samples: int = 0, shard: bool = True,
                       with_predictions: bool = True) -> tuple[dict, dict | None]:
    """(metrics, predictions): TR@K / IR@K of ITC top-k re-ranked with ITM, and per query its rank and
    top answers (`ranked_predictions`; None unless `with_predictions`), the same on every rank.

    shard=True: each rank encodes and re-ranks its share (an un-partitioned model per rank).
    shard=False: every rank does all the work — inside ZeRO-3 training, where all ranks must make the
    same module calls; the caller gathers the root-level parameters (query tokens, temperature).
    """
    model.eval()
    rank, world = _rank_world() if shard else (0, 1)
    images, refs = load_retrieval_split(split, max_samples)
    texts = [pre_caption(c) for caps in refs for c in caps]
    txt2img = np.array([i for i, caps in enumerate(refs) for _ in caps])
    img2txt, start = [], 0
    for caps in refs:
        img2txt.append(list(range(start, start + len(caps))))
        start += len(caps)
    tf = build_transform(image_size, False)
    device = next(model.parameters()).device

    # Encode every text and this rank's share of the images, then share the features.
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_txt_len, return_tensors="pt")
    text_ids, text_mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    text_feat = torch.cat([model.encode_text(text_ids[i:i + batch_size], text_mask[i:i + batch_size]).float()
                           for i in range(0, len(texts), batch_size)])             # (Nt, E)
    # Whole batches are dealt round-robin to ranks, so every image is encoded in the same batch whatever
    # the world size (kernels may round differently for another batch composition; results must not).
    batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
    mine = [j for b in batches[rank::world] for j in b]
    embeds, feats = [], []
    for batch in batches[rank::world]:
        px = torch.stack([tf(Image.open(io.BytesIO(images[j])).convert("RGB")) for j in batch])
        e, f = model.encode_image(px.to(device))
        embeds.append(e.cpu())
        feats.append(f.float().cpu())
    shards = _all_gather_objects((mine, torch.cat(embeds) if embeds else None,
                                  torch.cat(feats) if feats else None), world)
    order = [j for m, _, _ in shards for j in m]
    image_embeds = torch.cat([e for _, e, _ in shards if e is not None])[np.argsort(order)]   # (Ni, 1+N, W)
    image_feats = torch.cat([f for _, _, f in shards if f is not None])[np.argsort(order)]    # (Ni, Nq, E)

    # ITC similarity: max over queries of query·text.
    sim_i2t = torch.einsum("iqe,te->itq", image_feats, text_feat.cpu()).amax(-1)                   # (Ni, Nt)

    def itm_i2t(i, cols):
        n = len(cols)
        return model.itm_scores(image_embeds[i:i + 1].expand(n, -1, -1).to(device), text_ids[cols],
                                text_mask[cols]).float().cpu()

    def itm_t2i(t, cols):
        n = len(cols)
        return model.itm_scores(image_embeds[cols].to(device), text_ids[t:t + 1].expand(n, -1),
                                text_mask[t:t + 1].expand(n, -1)).float().cpu()

    scores_i2t = rerank_with_itm(sim_i2t, k_test, itm_i2t, rows=range(rank, len(images), world))
    scores_t2i = rerank_with_itm(sim_i2t.t().contiguous(), k_test, itm_t2i, rows=range(rank, len(texts), world))
    if world > 1:  # each row was scored on exactly one rank; -inf elsewhere
        dist.all_reduce(scores_i2t, op=dist.ReduceOp.MAX)
        dist.all_reduce(scores_t2i, op=dist.ReduceOp.MAX)
    scores_i2t, scores_t2i = scores_i2t.numpy(), scores_t2i.numpy()
    ranks = first_correct_ranks(scores_i2t, scores_t2i, img2txt, txt2img.tolist())
    metrics = recall_from_ranks(*ranks)
    itc_only = recall_metrics(sim_i2t.numpy(), sim_i2t.t().numpy(), img2txt, txt2img.tolist())
    metrics.update({f"itc_{k}": v for k, v in itc_only.items() if k in ("txt_r1", "img_r1")})
    chance = chance_recall_at_1(len(images), len(texts), len(texts) / max(1, len(images)))
    metrics.update({"chance_txt_r1": chance["txt_r1"], "chance_img_r1": chance["img_r1"],
                    "num_images": len(images), "num_texts": len(texts), "k_test": min(k_test, len(texts))})
    if not math.isfinite(metrics["r_mean"]):
        raise RuntimeError("retrieval metrics are not finite")
    if not with_predictions:
        return metrics, None
    return metrics, ranked_predictions(scores_i2t, scores_t2i, img2txt, txt2img.tolist(), texts, ranks)
