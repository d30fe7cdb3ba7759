"""BLIP-2 stage-1 losses as pure functions: ITC, ITM hard-negative sampling, ITM, ITG.

Everything a loss needs to know about other ranks comes in through a `WorldInfo`, so the same code
runs on one CPU rank in tests and on N ranks in training (see DESIGN.md §4 for the definitions).

Conventions: B is the local batch, W the world size, Nq the number of query tokens, E the ITC
embedding width. "Global" indices address the rank-ordered concatenation of all ranks' batches, so
local sample i of rank r has global index r*B + i.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from blip_train.models.world import WorldInfo

LABEL_SMOOTHING = 0.1
"""Label smoothing of ITC and ITG (BLIP-2); ITM uses none."""


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 (bf16/fp16 log-softmax is too coarse), fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ItcOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar: mean of the image→text and text→image cross-entropies."""
    loss_i2t: torch.Tensor
    """Scalar image→text term (gradient to the image side and temp only)."""
    loss_t2i: torch.Tensor
    """Scalar text→image term (gradient to the text side and temp only)."""
    sim_i2t: torch.Tensor
    """(B, B*W) local images vs. all texts, already divided by temp; detached (for ITM sampling)."""
    sim_t2i: torch.Tensor
    """(B, B*W) local texts vs. all images, already divided by temp; detached."""


def positive_mask(world: WorldInfo, batch_size: int, device: torch.device,
                  image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, B*W) bool: which global entries are positives of each local sample.

    Always the sample's own global index; with `image_ids`, also every entry showing the same image
    (COCO has five captions per image: those pairs must not be pushed apart nor drawn as negatives).
    """
    own = world.rank * batch_size + torch.arange(batch_size, device=device)  # (B,)
    cols = torch.arange(batch_size * world.size, device=device)  # (B*W,)
    pos = own[:, None] == cols[None, :]  # (B, B*W)
    if image_ids is not None:
        all_ids = world.gather(image_ids)  # (B*W,)
        pos = pos | (image_ids[:, None] == all_ids[None, :])
    return pos


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean over rows of CE against probability targets mixed with the uniform distribution.

    The target row is q = (1 - ls) * targets + ls / C (C = number of classes). For a one-hot `targets`
    this is exactly `F.cross_entropy(..., label_smoothing=ls)`; for soft targets (several positives)
    the smoothing mass is spread the same way, over all C classes.
    """
    num_classes = logits.shape[-1]
    q = (1.0 - label_smoothing) * targets + label_smoothing / num_classes  # (B, C)
    return -(q * F.log_softmax(_at_least_fp32(logits), dim=-1)).sum(-1).mean()


def itc_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor, world: WorldInfo,
             image_ids: Optional[torch.Tensor] = None,
             label_smoothing: float = LABEL_SMOOTHING) -> ItcOutput:
    """Image-text contrastive loss (BLIP-2 §3.1) over the global batch.

    image_feats: (B, Nq, E) L2-normalised projections of the query outputs.
    text_feat: (B, E) L2-normalised projection of the [CLS] output.
    temp: scalar temperature (the caller clamps it).
    image_ids: optional (B,) ids; pairs showing the same image are positives (soft targets, see
    `soft_cross_entropy`). Without ids, the target of local sample i is global index rank*B + i.

    Only the local operand of each direction carries gradient (the gathered one is detached, also
    on one rank), so image→text trains the image side and text→image the text side; the temperature
    gets gradient from both. Averaged over ranks, the loss equals the 1-rank loss of the concatenated
    batch, because every rank sees the same global similarity rows for its own samples.
    """
    bsz = image_feats.shape[0]
    all_text = world.gather(text_feat)  # (B*W, E), no grad
    all_image = world.gather(image_feats)  # (B*W, Nq, E), no grad

    # Best-matching query per (image, text) pair: max over the Nq query embeddings.
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, all_text).amax(-1) / temp  # (B, B*W)
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, all_image).amax(-1) / temp  # (B, B*W)

    if image_ids is None:
        targets = world.rank * bsz + torch.arange(bsz, device=image_feats.device)  # (B,)
        loss_i2t = F.cross_entropy(_at_least_fp32(sim_i2t), targets, label_smoothing=label_smoothing)
        loss_t2i = F.cross_entropy(_at_least_fp32(sim_t2i), targets, label_smoothing=label_smoothing)
    else:
        pos = positive_mask(world, bsz, image_feats.device, image_ids)  # (B, B*W)
        pos = pos.to(torch.promote_types(sim_i2t.dtype, torch.float32))
        soft = pos / pos.sum(1, keepdim=True)  # each row sums to 1 (own index is always positive)
        loss_i2t = soft_cross_entropy(sim_i2t, soft, label_smoothing)
        loss_t2i = soft_cross_entropy(sim_t2i, soft, label_smoothing)
    loss = (loss_i2t + loss_t2i) / 2
    return ItcOutput(loss, loss_i2t, loss_t2i, sim_i2t.detach(), sim_t2i.detach())


def _draw_negatives(sim: torch.Tensor, pos: torch.Tensor, own: torch.Tensor,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
    """One index per row, drawn with probability softmax(sim) restricted to the non-positives.

    sim, pos: (B, B*W); own: (B,) global index of each row's own pair.
    """
    # fp32 softmax: bf16 logits lose the small weights. Non-finite sims (a diverged step that the
    # trainer will skip) must not crash multinomial, so they are made finite first.
    logits = torch.nan_to_num(sim.float(), nan=0.0, posinf=1e4, neginf=-1e4)
    weights = logits.masked_fill(pos, float("-inf")).softmax(dim=1)  # (B, B*W); NaN rows if all positive
    # A row whose global batch holds no non-positive (every sample shows the same image) has no true
    # negative: fall back to uniform over every entry but its own index (a same-image pair labelled
    # negative), or to its own index when the global batch has a single sample. Done with `where`,
    # not a branch, so there is no device sync.
    n = sim.shape[1]
    is_own = F.one_hot(own, n).bool()  # (B, B*W)
    fallback = (~is_own).float() if n > 1 else is_own.float()
    weights = torch.where(pos.all(dim=1, keepdim=True), fallback, weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)


def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, world: WorldInfo,
                          image_ids: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative per local sample in each direction, as global-batch indices.

    sim_i2t, sim_t2i: (B, B*W) ITC similarities already divided by temp (`ItcOutput`).
    Returns (neg_image_idx (B,), neg_text_idx (B,)): for local text i a negative image drawn with
    probability softmax(sim_t2i[i]), and for local image i a negative text drawn from
    softmax(sim_i2t[i]), both with the sample's positives (own index and, with `image_ids`, every
    same-image entry) given zero weight. See `_draw_negatives` for the all-positive fallback.

    Randomness comes from `generator` (on the sims' device) or torch's global RNG, whose state the
    trainer checkpoints, so a resumed run draws the same negatives. Ranks should seed differently
    so that they do not draw correlated negatives.
    """
    with torch.no_grad():
        bsz = sim_i2t.shape[0]
        pos = positive_mask(world, bsz, sim_i2t.device, image_ids)  # (B, B*W)
        own = world.rank * bsz + torch.arange(bsz, device=sim_i2t.device)  # (B,)
        neg_image_idx = _draw_negatives(sim_t2i, pos, own, generator)
        neg_text_idx = _draw_negatives(sim_i2t, pos, own, generator)
    return neg_image_idx, neg_text_idx


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """Image-text matching loss: plain CE over (3B, 2) logits of [pos; neg-image; neg-text].

    Class 1 means "matched": the first B rows are positives, the other 2B negatives.
    """
    bsz = logits.shape[0] // 3
    targets = torch.cat([torch.ones(bsz, dtype=torch.long, device=logits.device),
                         torch.zeros(2 * bsz, dtype=torch.long, device=logits.device)])  # (3B,)
    return F.cross_entropy(_at_least_fp32(logits), targets)


def itg_loss(logits: torch.Tensor, labels: torch.Tensor,
             label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Image-grounded text generation loss: next-token CE with label smoothing.

    logits: (B, T, V) over the text positions; labels: (B, T), -100 where no loss is taken.
    Position t predicts token t+1; the mean runs over the non-ignored target tokens of the batch.
    """
    shifted = _at_least_fp32(logits[:, :-1])  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)
