"""Beam search for a decoder that re-reads its whole prefix each step (BLIP's MED: captions are short).

The search keeps, per input, `num_beams` running hypotheses and the `num_beams` best finished ones, with the
rules of transformers' `generate(num_beams=K)` (early_stopping=False), so that a BLIP exported to
`BlipForConditionalGeneration` writes the same captions:

- scores are sums of token log-probabilities (log-softmax in fp32); before `min_new_tokens` tokens the end
  token is impossible;
- each step ranks the 2K best (beam, token) continuations: the K best that do not end form the next running
  beams; those among the first K that end (the end token, or the last allowed step) become finished candidates
  scored sum / generated_length ** length_penalty, and the K best finished hypotheses are kept;
- a search stops improving once every finished slot is taken and the best running beam, scored at its current
  length, cannot beat the worst of them; later candidates are ignored.

Every step runs whatever the hypotheses do (ZeRO-3: all ranks call the same modules the same number of times).
"""
from __future__ import annotations

from typing import Callable

import torch

NEG = -1.0e9
"""The score of an impossible hypothesis (finite, as transformers uses, so sums stay ordered)."""


@torch.no_grad()
def beam_search(next_logits: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, steps: int,
                num_beams: int, eos_id: int, pad_id: int, min_new_tokens: int = 0,
                length_penalty: float = 1.0) -> torch.Tensor:
    """(N, steps) tokens after `prompt` (N, P) for each input: the best finished hypothesis, its end token kept
    and `pad_id` after it.

    next_logits(ids) maps the (N * num_beams, L) running prefixes, input-major, to their next-token logits
    (N * num_beams, V). Hypotheses of one input never mix with another's.
    """
    n, p0 = prompt.shape
    k, dev = num_beams, prompt.device
    running = prompt.repeat_interleave(k, dim=0).reshape(n, k, p0)  # (N, K, L)
    run_scores = torch.full((n, k), NEG, device=dev)
    run_scores[:, 0] = 0.0  # the K copies of the prompt must not be K identical beams
    done_seqs = torch.full((n, k, p0 + steps), pad_id, dtype=torch.long, device=dev)
    done_scores = torch.full((n, k), NEG, device=dev)
    done = torch.zeros((n, k), dtype=torch.bool, device=dev)  # which finished slots hold a hypothesis
    improving = torch.ones((n, 1), dtype=torch.bool, device=dev)
    rows = torch.arange(n, device=dev)[:, None]
    for t in range(steps):
        logp = torch.log_softmax(next_logits(running.reshape(n * k, -1)).float(), dim=-1)  # (N*K, V)
        if t < min_new_tokens:
            logp[:, eos_id] = float("-inf")
        vocab = logp.shape[-1]
        total = (logp.reshape(n, k, vocab) + run_scores[:, :, None]).reshape(n, k * vocab)
        top_scores, top_idx = total.topk(2 * k, dim=1)  # (N, 2K)
        beam, token = top_idx // vocab, top_idx % vocab
        cand = torch.cat([running[rows, beam], token[:, :, None]], dim=2)  # (N, 2K, L+1)
        ends = (token == eos_id) | (t == steps - 1)  # (N, 2K)

        keep = (top_scores + NEG * ends).topk(k, dim=1).indices  # the K best that go on
        running, run_scores = cand[rows, keep], (top_scores + NEG * ends)[rows, keep]

        # Finished candidates: those among the first K that end, while the search can still improve.
        first_k = torch.arange(2 * k, device=dev)[None, :] < k
        new = ends & first_k & improving
        new_scores = torch.where(new, top_scores / float(t + 1) ** length_penalty, torch.full_like(top_scores, NEG))
        padded = torch.full((n, 2 * k, p0 + steps), pad_id, dtype=torch.long, device=dev)
        padded[:, :, :p0 + t + 1] = cand
        pool_scores = torch.cat([done_scores, new_scores], dim=1)  # (N, 3K)
        best = pool_scores.topk(k, dim=1).indices
        done_seqs = torch.cat([done_seqs, padded], dim=1)[rows, best]
        done = torch.cat([done, new], dim=1)[rows, best]
        done_scores = pool_scores[rows, best]

        worst_done = torch.where(done, done_scores.min(dim=1, keepdim=True).values, torch.full_like(done_scores, NEG))
        best_running = run_scores[:, :1] / float(t + 1) ** length_penalty
        improving = improving & (best_running > worst_done).any(dim=1, keepdim=True)
    return done_seqs[:, 0, p0:]
