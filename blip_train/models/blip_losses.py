"""ALBEF / BLIP pretraining losses and momentum-model pieces, as pure functions and plain modules.

ALBEF (Li et al. 2021) and BLIP (Li et al. 2022) train ITC against a momentum (EMA) copy of the
encoders and a queue of its past features, distil the momentum model's soft predictions into ITC
(and, in ALBEF, into MLM), and ramp the distillation weight alpha up during the first epoch.
Everything about other ranks arrives through a `WorldInfo` (see DESIGN.md §11).

Reused from `stage1_losses`, not redefined here:
- ITM: `global_sims` gives the (B, B*W) similarities of the local batch vs. the gathered global
  batch; `sample_hard_negatives` draws the negatives from them; `itm_loss` is plain CE over
  [pos; neg-image; neg-text].
- LM (BLIP's decoder): `lm_loss` is `itg_loss` with label smoothing 0.1. The token conventions belong
  to the collator: the first token ([CLS]) is replaced by [DEC] and padding becomes -100 in labels.

Conventions: B is the local batch, W the world size, G = B*W the global batch, E the ITC width,
Q the queue length, V the vocabulary.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from blip_train.models.stage1_losses import (_at_least_fp32, itg_loss, itm_loss, positive_mask,
                                              sample_hard_negatives, soft_cross_entropy)
from blip_train.models.world import WorldInfo

__all__ = ["FeatureQueue", "MomentumItcOutput", "alpha_at", "answer_log_likelihood", "copy_params_", "global_sims",
           "itm_loss", "lm_loss", "mask_tokens", "mlm_loss", "momentum_itc_loss", "momentum_update_", "positive_mask",
           "sample_hard_negatives", "weighted_answer_loss"]

LM_LABEL_SMOOTHING = 0.1
"""Label smoothing of BLIP's LM loss."""

TensorPairs = Iterable[tuple[torch.Tensor, torch.Tensor]]


class FeatureQueue(nn.Module):
    """FIFO of past momentum features (and, for fine-tuning, their image ids), one column per sample.

    Every rank enqueues the same gathered global batch, so the queues stay identical across ranks
    without communication; the buffers are in `state_dict`, so the checkpoint carries them. For the
    initial queues to agree too, build it on every rank with an identically seeded `generator`.
    """

    image_queue: torch.Tensor
    """(E, Q) momentum image features, one unit column per sample."""
    text_queue: torch.Tensor
    """(E, Q) momentum text features."""
    idx_queue: Optional[torch.Tensor]
    """(1, Q) image ids (fine-tuning: same-id columns are positives), or None."""
    ptr: torch.Tensor
    """(1,) long: the column the next enqueue starts at."""

    def __init__(self, embed_dim: int, queue_size: int, with_idx: bool = False,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        # Random unit columns, as the authors initialise: until the queue has filled once, these
        # act as uninformative negatives rather than zeros (which would all tie at similarity 0).
        for name in ("image_queue", "text_queue"):
            self.register_buffer(name, F.normalize(torch.randn(embed_dim, queue_size, generator=generator), dim=0))
        # -100 never equals a real image id, so unfilled slots are never positives.
        self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long) if with_idx else None)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def queue_size(self) -> int:
        return self.image_queue.shape[1]

    @torch.no_grad()
    def enqueue_(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                 idx: Optional[torch.Tensor] = None) -> None:
        """Write the gathered (G, E) features (and (G,) ids) at `ptr`; ptr = (ptr + G) % Q."""
        g = image_feat.shape[0]
        if text_feat.shape != image_feat.shape or image_feat.shape[1] != self.image_queue.shape[0]:
            raise ValueError(f"enqueue_ expects two (G, {self.image_queue.shape[0]}) feature tensors, "
                             f"got {tuple(image_feat.shape)} and {tuple(text_feat.shape)}")
        if self.queue_size % g != 0:
            raise ValueError(f"model.queue_size ({self.queue_size}) must be a multiple of the global batch "
                             f"({g} = micro batch x world size): set model.queue_size accordingly")
        if (idx is None) != (self.idx_queue is None):
            raise ValueError("pass idx exactly when the queue was built with_idx=True")
        # Column indices from the ptr tensor instead of slicing with int(ptr): no device sync.
        cols = (self.ptr + torch.arange(g, device=self.ptr.device)) % self.queue_size  # (G,)
        self.image_queue.index_copy_(1, cols, image_feat.detach().T.to(self.image_queue.dtype))  # (E, G)
        self.text_queue.index_copy_(1, cols, text_feat.detach().T.to(self.text_queue.dtype))  # (E, G)
        if self.idx_queue is not None:
            self.idx_queue.index_copy_(1, cols, idx.reshape(1, g).to(self.idx_queue.dtype))  # (1, G)
        self.ptr.copy_((self.ptr + g) % self.queue_size)


def _check_pairs(pairs: TensorPairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = list(pairs)
    for online, momentum in pairs:
        if online.shape != momentum.shape:
            raise ValueError(f"online {tuple(online.shape)} and momentum {tuple(momentum.shape)} differ in shape")
    return pairs


@torch.no_grad()
def momentum_update_(pairs: TensorPairs, momentum: float) -> None:
    """m = m * momentum + p * (1 - momentum), in place, for each (online p, momentum m) pair.

    Elementwise, so it works on ZeRO-3 local partitions as well as on whole parameters. The update is
    computed in m's dtype: an fp32 EMA of bf16 weights keeps the small (1 - momentum) increments
    that a bf16 EMA would round away.
    """
    for online, mom in _check_pairs(pairs):
        mom.mul_(momentum).add_(online.detach().to(mom.dtype), alpha=1.0 - momentum)


@torch.no_grad()
def copy_params_(pairs: TensorPairs) -> None:
    """m = p for each (online p, momentum m) pair: the momentum model starts as the online one."""
    for online, mom in _check_pairs(pairs):
        mom.copy_(online.detach())


class MomentumItcOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar: mean of the image→text and text→image terms."""
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor
    sim_i2t: torch.Tensor
    """(B, B+Q) local online images vs. [local momentum texts; text queue], / temp, detached."""
    sim_t2i: torch.Tensor
    """(B, B+Q) local online texts vs. [local momentum images; image queue], / temp, detached."""


def momentum_itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                      text_feat_m: torch.Tensor, queue: FeatureQueue, temp: Union[torch.Tensor, float],
                      alpha: float, idx: Optional[torch.Tensor] = None,
                      label_smoothing: float = 0.0) -> MomentumItcOutput:
    """ITC with a momentum encoder, a feature queue and momentum distillation (ALBEF §3.2-3.3).

    image_feat, text_feat: (B, E) normalised online features (with grad); image_feat_m, text_feat_m:
    (B, E) normalised momentum features (treated as constants). The candidates of each row are
    the B + Q columns [local momentum batch; queue]. Hard targets: the row's own column or, with
    `idx` (B,) image ids, every column with the same id over [idx; idx_queue], normalised per row.
    Soft targets = alpha * softmax(sim_m) + (1 - alpha) * hard, where sim_m scores the momentum
    features against the same columns. With label_smoothing, the smoothing of `soft_cross_entropy`
    is applied on top of the soft targets. The caller enqueues the gathered momentum features after
    this call (so the current batch is not its own queue negative) and clamps temp beforehand.
    """
    dtype = torch.promote_types(image_feat.dtype, torch.float32)  # log-softmax over B+Q columns in >= fp32
    img, txt = image_feat.to(dtype), text_feat.to(dtype)
    # torch.cat copies the queue, so the in-place enqueue after this call does not touch what
    # autograd saved for backward.
    img_all = torch.cat([image_feat_m.detach().T.to(dtype), queue.image_queue.to(dtype)], dim=1)  # (E, B+Q)
    txt_all = torch.cat([text_feat_m.detach().T.to(dtype), queue.text_queue.to(dtype)], dim=1)  # (E, B+Q)

    with torch.no_grad():
        bsz = image_feat.shape[0]
        if idx is None:
            hard = torch.eye(bsz, img_all.shape[1], dtype=dtype, device=img.device)  # (B, B+Q)
        else:
            if queue.idx_queue is None:
                raise ValueError("momentum_itc_loss got idx but the queue was built without with_idx")
            idx_all = torch.cat([idx.reshape(-1), queue.idx_queue.reshape(-1)])  # (B+Q,)
            pos = (idx.reshape(-1, 1) == idx_all[None, :]).to(dtype)  # (B, B+Q)
            hard = pos / pos.sum(1, keepdim=True)  # own column is always positive: no division by 0
        temp_m = temp.detach() if isinstance(temp, torch.Tensor) else temp
        sim_i2t_m = image_feat_m.to(dtype) @ txt_all / temp_m  # (B, E) @ (E, B+Q) -> (B, B+Q)
        sim_t2i_m = text_feat_m.to(dtype) @ img_all / temp_m  # (B, B+Q)
        targets_i2t = alpha * sim_i2t_m.softmax(dim=1) + (1.0 - alpha) * hard
        targets_t2i = alpha * sim_t2i_m.softmax(dim=1) + (1.0 - alpha) * hard

    sim_i2t = img @ txt_all / temp  # (B, E) @ (E, B+Q) -> (B, B+Q)
    sim_t2i = txt @ img_all / temp  # (B, B+Q)
    loss_i2t = soft_cross_entropy(sim_i2t, targets_i2t, label_smoothing)
    loss_t2i = soft_cross_entropy(sim_t2i, targets_t2i, label_smoothing)
    return MomentumItcOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, sim_i2t.detach(), sim_t2i.detach())


@torch.no_grad()
def global_sims(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: Union[torch.Tensor, float],
                world: WorldInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(sim_i2t, sim_t2i), each (B, B*W): local online features vs. the gathered global batch, / temp.

    BLIP draws ITM hard negatives from the whole global batch (not the queue), with these
    similarities; feed them to `sample_hard_negatives`. Detached: sampling needs no gradient.
    """
    img, txt = _at_least_fp32(image_feat), _at_least_fp32(text_feat)
    all_img = _at_least_fp32(world.gather(image_feat))  # (B*W, E)
    all_txt = _at_least_fp32(world.gather(text_feat))  # (B*W, E)
    return img @ all_txt.T / temp, txt @ all_img.T / temp  # (B, E) @ (E, B*W) -> (B, B*W)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BLIP's decoder loss: `itg_loss` (shifted CE) with label smoothing 0.1.

    logits (B, T, V); labels (B, T) from the collator: [DEC] in place of the first token, -100 on
    padding (and on the [DEC] position, which is never a target after the shift anyway).
    """
    return itg_loss(logits, labels, label_smoothing=LM_LABEL_SMOOTHING)


def _token_nll(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Shifted per-token CE (N, T-1), 0 where the target is -100: position t predicts token t+1."""
    shifted = _at_least_fp32(logits[:, :-1])  # (N, T-1, V)
    return F.cross_entropy(shifted.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none",
                           label_smoothing=label_smoothing)


def weighted_answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                         num_questions: int) -> torch.Tensor:
    """BLIP's VQA loss: each answer sequence's summed token CE (label smoothing 0.1, as the LM loss) times the
    answer's weight, summed over the N answers of the batch and divided by its number of questions.

    logits (N, Ta, V) of the answer decoder; labels (N, Ta): [DEC] answer [SEP] with padding -100; weights (N,):
    VQAv2 gives each distinct answer its share of the 10 annotators (a question's weights sum to 1).
    """
    per_answer = _token_nll(logits, labels, LM_LABEL_SMOOTHING).sum(1)  # (N,)
    return (weights.to(per_answer.dtype) * per_answer).sum() / num_questions


def answer_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(answer | question) (N,) of each candidate sequence: the summed log-probabilities of its target
    tokens (labels as in `weighted_answer_loss`, no smoothing)."""
    return -_token_nll(logits, labels, 0.0).sum(1)


def mask_tokens(input_ids: torch.Tensor, vocab_size: int, mask_token_id: int,
                special_ids: Sequence[int], generator: Optional[torch.Generator] = None,
                probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking for ALBEF's MLM; returns new (masked_ids, labels), input_ids is unchanged.

    Each non-special token is chosen with `probability`; of the chosen, 80% become [MASK], 10% a
    token drawn uniformly from the whole vocabulary (as BERT and ALBEF do), 10% stay. labels hold
    the original id at chosen positions and -100 elsewhere. All randomness comes from `generator`
    (checkpointed by the trainer), with a fixed number of draws per call, so a resumed run masks
    the same tokens; draws are made on the generator's device and moved to input_ids'. Without a
    generator, torch's global RNG on input_ids' device (which the trainer checkpoints per rank).
    """
    shape, dev = input_ids.shape, (generator.device if generator is not None else input_ids.device)
    u = torch.rand((3, *shape), generator=generator, device=dev).to(input_ids.device)  # (3, B, T)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=dev).to(input_ids.device)
    special = torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=input_ids.dtype,
                                                    device=input_ids.device))
    chosen = (u[0] < probability) & ~special
    to_mask = chosen & (u[1] < 0.8)
    to_random = chosen & ~to_mask & (u[2] < 0.5)  # half of the remaining 20%
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, logits_m: Optional[torch.Tensor] = None,
             alpha: float = 0.0) -> torch.Tensor:
    """Masked-LM CE over the chosen positions, optionally distilled from momentum logits (ALBEF).

    logits, logits_m: (B, T, V); labels: (B, T), -100 where not chosen. With logits_m:
    (1 - alpha) * CE + alpha * mean over chosen of -sum_v softmax(logits_m) * log_softmax(logits).
    Means are masked sums over max(1, #chosen): a batch with nothing chosen gives 0, not NaN, and
    no boolean indexing means no device sync.
    """
    logp = F.log_softmax(_at_least_fp32(logits), dim=-1)  # (B, T, V)
    chosen = labels != -100  # (B, T)
    count = chosen.sum().clamp_min(1)
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    loss = (nll * chosen).sum() / count
    if logits_m is None:
        return loss
    soft = F.softmax(_at_least_fp32(logits_m.detach()), dim=-1).to(logp.dtype)  # (B, T, V)
    distill = -(soft * logp).sum(-1)  # (B, T)
    return (1.0 - alpha) * loss + alpha * (distill * chosen).sum() / count


def alpha_at(step: int, alpha: float, ramp_steps: int) -> float:
    """Distillation weight at `step`: alpha * min(1, step / ramp_steps); no ramp when ramp_steps is 0.

    ALBEF and BLIP ramp alpha linearly over the first epoch, while the momentum model is still poor.
    """
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
    return alpha if ramp_steps == 0 else alpha * min(1.0, step / ramp_steps)
