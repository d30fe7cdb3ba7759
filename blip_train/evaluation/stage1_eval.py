"""Retrieval evaluation of a stage-1 model on an MDS split, sharded over ranks.

Every rank holds all captions (tokenized; texts are small) and reads only the images it encodes.
Work is dealt in whole batches (see distributed.py): text batches and image batches round-robin;
then ITC features (small: (Nq, E) per image, E per text) are gathered so every rank has the full
similarity matrix. The ViT outputs an image's ITM re-ranking needs ((1+N, W) per image, 1.4 MB for
ViT-g) stay on the rank that encoded it: that rank scores every re-ranked pair of its images, both
directions at once, and only the scores are gathered.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from streaming import StreamingDataset

from blip_train.data.collate import pre_caption
from blip_train.data.schema import verify_split
from blip_train.data.shared_memory import build_streaming_dataset
from blip_train.data.transforms import build_transform
from blip_train.evaluation.distributed import (all_gather_rows, in_rank_order, plan_batches, progress_bar,
                                               rank_world)
from blip_train.evaluation.generate import needs_synced_gpus
from blip_train.evaluation.retrieval import (chance_recall_at_1, first_correct_ranks, ranked_predictions,
                                             recall_from_ranks, recall_metrics, reranked_scores, rerank_pairs)

SIM_BLOCK_ELEMENTS = 1 << 26
"""Elements of the (images x queries x texts) block the ITC similarity is computed in (256 MB in fp32)."""


class RetrievalSplitError(ValueError):
    """A split whose rows retrieval cannot map to images (one line, naming the split and the rows)."""


@dataclass
class RetrievalSplit:
    """The images a retrieval evaluation covers: for each, the row its pixels are read from, its dataset
    image_id and its reference captions, in split order (by first row)."""
    ds: StreamingDataset
    rows: list[int]
    image_ids: list[int]
    captions: list[list[str]]
    rows_read: int
    """Rows that belong to these images (more than len(rows) in a split written one row per caption)."""

    def read_image(self, i: int) -> Image.Image:
        """Image `i` (position in this split's image list), decoded as RGB."""
        return Image.open(io.BytesIO(self.read_image_bytes(i))).convert("RGB")

    def read_image_bytes(self, i: int) -> bytes:
        """Image `i` as stored (the eval transform decodes it, DCT-scaled to what it needs)."""
        return self.ds[self.rows[i]]["image"]

    def describe_grouping(self, name: str) -> str:
        """One line saying that rows were grouped into images (empty when every row is its own image)."""
        if self.rows_read == len(self.rows):
            return ""
        return (f"retrieval: {name}: {self.rows_read:,d} rows are {len(self.rows):,d} images (rows with the same "
                "image_id and captions grouped into one image; the split was converted one row per caption)")


def load_retrieval_split(split: str, max_samples: int = 0) -> RetrievalSplit:
    """The first `max_samples` images of `split` (0: all) with their reference captions, in split order.

    A split converted one row per caption (COCO without --per-image) repeats each image on several rows,
    each carrying the image's full `captions` list and its `image_id`: rows of one image_id with equal
    captions are one image (its pixels read from its first row), else every caption would count as an
    image and the recalls would drop. Rows that share an image_id but not their captions raise
    RetrievalSplitError: the ids do not identify images then. Images are not decoded here: each rank
    reads those it encodes, one batch at a time.
    """
    verify_split(split)
    ds = build_streaming_dataset(lambda: StreamingDataset(local=split, shuffle=False, batch_size=1))
    seen: dict[int, int] = {}  # image_id -> position in the image list
    out = RetrievalSplit(ds, [], [], [], 0)
    for r in range(ds.num_samples):  # len(ds) is only this rank's share when a process group exists
        row = ds[r]
        image_id = int(row["image_id"])
        refs = [c for c in (list(row["captions"]) or [row["caption"]]) if c]
        if image_id in seen:
            first = seen[image_id]
            if refs != out.captions[first]:
                raise RetrievalSplitError(
                    f"{split}: rows {out.rows[first]} and {r} share image_id {image_id} but carry different "
                    "captions, so image_id does not identify images here and retrieval cannot tell which captions "
                    "belong to which image (write one row per image: tools/convert_coco.py --per-image)")
            out.rows_read += 1
            continue
        if max_samples and len(out.rows) >= max_samples:
            break  # later rows of the images already taken add nothing: each row carries all their captions
        if not refs:
            raise RetrievalSplitError(f"{split}: row {r} (image_id {image_id}) has no caption; retrieval needs "
                                      "each image's captions (columns captions / caption)")
        seen[image_id] = len(out.rows)
        out.rows.append(r)
        out.image_ids.append(image_id)
        out.captions.append(refs)
        out.rows_read += 1
    return out


def itc_similarity(image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """(Ni, Nq, E), (Nt, E) → (Ni, Nt) on the CPU: max over queries of query·text, in image blocks
    (the whole (Ni, Nq, Nt) product would be 16 GB in fp32 for COCO's 5k images and 25k captions)."""
    ni, nq, _ = image_feats.shape
    nt = text_feat.shape[0]
    block = max(1, SIM_BLOCK_ELEMENTS // max(1, nq * nt))
    out = []
    for i in range(0, ni, block):
        f = image_feats[i:i + block]                                                  # (B, Nq, E)
        out.append((f.flatten(0, 1) @ text_feat.t()).view(f.shape[0], nq, nt).amax(1).cpu())  # (B, Nt)
    return torch.cat(out)


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, split: str | RetrievalSplit, image_size: int, max_txt_len: int,
                       k_test: int = 128, batch_size: int = 64, max_samples: int = 0,
                       predicted_images: int | None = None, progress: bool = False) -> tuple[dict, dict]:
    """(metrics, predictions): TR@K / IR@K of ITC top-k re-ranked with ITM, and per query its rank and
    top answers (`ranked_predictions`), the same on every rank. predicted_images=n: predictions of the
    first n images and their captions only (None: all).

    `split`: a split directory, or one already opened with `load_retrieval_split` (`max_samples` is
    then ignored). progress=True shows rank 0's progress bars (standalone evaluation).

    All ranks call it together. With ZeRO-3 weights partitioned over the ranks (in-training evaluation;
    the caller gathers the root-level parameters: query tokens, temperature), every rank makes the same
    number of text-encoding, image-encoding and ITM calls, repeating one when it has fewer.
    """
    model.eval()
    rank, world = rank_world()
    lockstep = needs_synced_gpus(model)
    images = split if isinstance(split, RetrievalSplit) else load_retrieval_split(split, max_samples)
    refs = images.captions
    texts = [pre_caption(c) for caps in refs for c in caps]
    txt2img = np.array([i for i, caps in enumerate(refs) for _ in caps])
    img2txt, start = [], 0
    for caps in refs:
        img2txt.append(list(range(start, start + len(caps))))
        start += len(caps)
    ni, nt = len(refs), len(texts)
    tf = build_transform(image_size, False)
    device = next(model.parameters()).device

    # Text features: this rank's text batches, then everyone's.
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_txt_len, return_tensors="pt")
    text_ids, text_mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    feats = [torch.zeros(0, model.text_proj.out_features, device=device)]
    plan = plan_batches(nt, batch_size, rank, world, lockstep)
    for batch, keep in progress_bar(plan, "retrieval: texts", progress):
        f = model.encode_text(text_ids[batch.start:batch.stop], text_mask[batch.start:batch.stop])  # (B, E)
        if keep:
            feats.append(f.float())
    text_plans = [[j for b, _ in plan_batches(nt, batch_size, r, world) for j in b] for r in range(world)]
    text_feat = in_rank_order(all_gather_rows(torch.cat(feats), world), text_plans, nt)  # (Nt, E)

    # Image features: this rank's image batches, read one batch at a time; ViT outputs stay here for ITM.
    embeds, feats = [], [torch.zeros(0, model.image_feat_tokens, model.vision_proj.out_features, device=device)]
    spare = None  # a ViT output for the lockstep's repeated ITM calls
    plan = plan_batches(ni, batch_size, rank, world, lockstep)
    for batch, keep in progress_bar(plan, "retrieval: images", progress):
        px = torch.stack([tf(images.read_image_bytes(j)) for j in batch])
        e, f = model.encode_image(px.to(device))                                      # (B, 1+N, W), (B, Nq, E)
        spare = e[:1]
        if keep:
            embeds.append(e)
            feats.append(f.float())
    image_plans = [[j for b, _ in plan_batches(ni, batch_size, r, world) for j in b] for r in range(world)]
    image_feats = in_rank_order(all_gather_rows(torch.cat(feats), world), image_plans, ni)  # (Ni, Nq, E)
    owned = image_plans[rank]
    image_embeds = torch.cat(embeds) if embeds else None                             # (len(owned), 1+N, W)
    row_of = {img: r for r, img in enumerate(owned)}

    sim_i2t = itc_similarity(image_feats, text_feat)                                  # (Ni, Nt)

    # ITM on the re-ranked pairs, each scored on the rank that holds its image, k_test pairs a call.
    pairs = rerank_pairs(sim_i2t, k_test)                                            # (P,) image * Nt + text
    bounds = np.searchsorted(pairs, np.arange(ni + 1) * nt)  # pairs of image i: [bounds[i], bounds[i+1])
    chunk = max(1, k_test)

    def calls_of(image_list: list[int]) -> list[range]:
        return [range(s, min(s + chunk, bounds[i + 1])) for i in image_list
                for s in range(bounds[i], bounds[i + 1], chunk)]

    my_calls = calls_of(owned)
    scores = [torch.zeros(0, device=device)]
    for call in progress_bar(my_calls, "retrieval: ITM re-rank", progress):
        row = row_of[int(pairs[call.start] // nt)]
        txt = torch.as_tensor(pairs[call.start:call.stop] % nt, device=device)
        e = image_embeds[row:row + 1].expand(len(call), -1, -1)                       # (n, 1+N, W)
        scores.append(model.itm_scores(e, text_ids[txt], text_mask[txt]).float())
    if lockstep:  # same number of ITM calls on every rank (ZeRO-3): repeat one, discard it
        most = max(len(calls_of(plan)) for plan in image_plans)
        for _ in range(most - len(my_calls)):
            model.itm_scores(spare, text_ids[:1], text_mask[:1])
    pair_plans = [np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in plan] or [np.zeros(0, np.int64)])
                  for plan in image_plans]
    pair_itm = in_rank_order(all_gather_rows(torch.cat(scores), world), pair_plans, len(pairs))  # (P,)
    scores_i2t, scores_t2i = reranked_scores(sim_i2t, k_test, pairs, pair_itm.cpu().numpy())

    ranks = first_correct_ranks(scores_i2t, scores_t2i, img2txt, txt2img.tolist())
    metrics = recall_from_ranks(*ranks)
    itc_only = recall_metrics(sim_i2t.numpy(), sim_i2t.t().numpy(), img2txt, txt2img.tolist())
    metrics.update({f"itc_{k}": v for k, v in itc_only.items() if k in ("txt_r1", "img_r1")})
    chance = chance_recall_at_1(ni, nt, nt / max(1, ni))
    metrics.update({"chance_txt_r1": chance["txt_r1"], "chance_img_r1": chance["img_r1"],
                    "num_images": ni, "num_texts": nt, "num_rows": images.rows_read, "k_test": min(k_test, nt)})
    if not math.isfinite(metrics["r_mean"]):
        raise RuntimeError("retrieval metrics are not finite")
    n = ni if predicted_images is None else min(predicted_images, ni)
    nt_n = img2txt[n - 1][-1] + 1 if n else 0  # texts are numbered image by image
    return metrics, ranked_predictions(scores_i2t[:n], scores_t2i[:nt_n], img2txt[:n], txt2img[:nt_n].tolist(),
                                       texts, (ranks[0][:n], ranks[1][:nt_n]), image_ids=images.image_ids)
