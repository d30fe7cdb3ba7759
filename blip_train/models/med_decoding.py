"""Text generation and answer ranking with a MED decoder (models/med.py), cross-attending to a memory: the
image's features (BLIP's captioner) or a question's states (BLIP's VQA answer decoder).

Plain functions over the module, no distribution inside. Under ZeRO-3 every rank must make the same module calls:
each routine runs a fixed number of decoder calls whatever the sequences do (finished ones continue as [PAD]).
"""
from __future__ import annotations

from typing import Optional

import torch

from blip_train.models.beam_search import beam_search
from blip_train.models.blip_losses import answer_log_likelihood
from blip_train.models.med import MED
from blip_train.models.stage1 import nucleus_sample


def decode(decoder: MED, memory: torch.Tensor, ids: torch.Tensor, steps: int, min_new_tokens: int, sep: int, pad: int,
           memory_mask: Optional[torch.Tensor] = None, top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`steps` tokens appended to `ids` (N, P) by `decoder` cross-attending to memory (N, M, W) (mask (N, M)):
    argmax, or nucleus sampling with top_p from `generator`; [SEP] is barred for the first min_new_tokens steps,
    and after it come [PAD]s. Every step re-encodes the whole prefix (no key/value cache: captions and answers
    are short)."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(steps):
        hidden = decoder(ids, torch.ones_like(ids), image_embeds=memory, image_mask=memory_mask, mode="decoder")
        logits = decoder.lm_logits(hidden[:, -1]).float()  # (N, V)
        if step < min_new_tokens:
            logits[:, sep] = float("-inf")
        nxt = logits.argmax(-1) if top_p is None else nucleus_sample(logits, top_p, generator)  # (N,)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        done = done | (nxt == sep)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def generate_after(decoder: MED, memory: torch.Tensor, memory_mask: Optional[torch.Tensor], start_ids: torch.Tensor,
                   max_new_tokens: int, min_new_tokens: int, num_beams: int, length_penalty: float, sep: int,
                   pad: int) -> torch.Tensor:
    """(B, max_new_tokens) ids that `decoder`, cross-attending to memory (B, M, W) (mask (B, M) or None), writes
    after start_ids (B, S): greedy, or beam search under transformers' rules (`models.beam_search`)."""
    if num_beams == 1:
        return decode(decoder, memory, start_ids, max_new_tokens, min_new_tokens, sep, pad,
                      memory_mask)[:, start_ids.shape[1]:]
    beams = memory.repeat_interleave(num_beams, dim=0)  # (B*K, M, W), row-major as the beams
    beams_mask = None if memory_mask is None else memory_mask.repeat_interleave(num_beams, dim=0)

    def next_logits(ids: torch.Tensor) -> torch.Tensor:
        hidden = decoder(ids, torch.ones_like(ids), image_embeds=beams, image_mask=beams_mask, mode="decoder")
        return decoder.lm_logits(hidden[:, -1])  # (B*K, V)

    return beam_search(next_logits, start_ids, max_new_tokens, num_beams, sep, pad, min_new_tokens, length_penalty)


def rank_candidates(decoder: MED, states: torch.Tensor, mask: torch.Tensor, answer_ids: torch.Tensor,
                    answer_mask: torch.Tensor, k: int) -> torch.Tensor:
    """BLIP's ranking over C candidate answers (answer_ids / answer_mask (C, Ta): [DEC] answer [SEP], right-padded)
    for questions whose states (B, Tq, D) / mask (B, Tq) the decoder cross-attends to: the k candidates whose first
    token is likeliest after [DEC] are scored by their whole log-likelihood (every token and [SEP]); returns each
    question's best candidate row (B,). Two decoder calls, whatever the questions are."""
    b, k = states.shape[0], min(k, answer_ids.shape[0])
    start = answer_ids[:1, :1].expand(b, 1)  # (B, 1) [DEC]
    first = decoder(start, torch.ones_like(start), image_embeds=states, image_mask=mask, mode="decoder")
    first_logp = decoder.lm_logits(first[:, 0]).float().log_softmax(-1)  # (B, V)
    top = first_logp[:, answer_ids[:, 1]].topk(k, dim=1).indices  # (B, k) candidate rows
    ids, ids_mask = answer_ids[top].flatten(0, 1), answer_mask[top].flatten(0, 1)  # (B*k, Ta)
    hidden = decoder(ids, ids_mask, image_embeds=states.repeat_interleave(k, dim=0),
                     image_mask=mask.repeat_interleave(k, dim=0), mode="decoder")  # (B*k, Ta, D)
    scores = answer_log_likelihood(decoder.lm_logits(hidden), ids.masked_fill(ids_mask == 0, -100)).view(b, k)
    return top.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)  # (B,)
