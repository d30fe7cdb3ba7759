"""Attention masks, each defined once. Boolean, True = may attend, shaped for `attend()`.

The Q-Former sequence is [queries (Nq); text (T)]. Its three self-attention patterns (BLIP-2, Fig. 2):

- unimodal (ITC): queries see only queries, text sees only text.
- bidirectional (ITM): every position sees every position.
- causal (ITG): queries see only queries; text position i sees all queries and text positions <= i.

Text padding keys (text_mask == 0) are never attended to. Query keys are always valid.
"""
from __future__ import annotations

from typing import Optional

import torch

QFORMER_MASKS = ("unimodal", "bidirectional", "causal")


def padding_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) with 1/True for real tokens -> key-padding mask (B, 1, 1, T)."""
    return attn_mask.bool()[:, None, None, :]


def causal_mask(t: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(1, 1, T, T): position i may attend to positions j <= i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]


def qformer_self_attention_mask(kind: str, num_queries: int, text_mask: Optional[torch.Tensor], *,
                                num_cached: int = 0, batch_size: int = 1,
                                device: Optional[torch.device] = None) -> torch.Tensor:
    """Self-attention mask over keys [queries; text] for the rows computed in this call.

    kind: unimodal | bidirectional | causal (see the module docstring).
    num_queries: query positions in the key sequence (cached or not).
    text_mask: (B, T) 1 = real text token, or None when there is no text.
    num_cached: leading query positions whose keys/values come from a cache; their rows are not
        computed again, so the mask has Nq - num_cached + T rows (0 or Nq in practice).
    Returns bool (B, 1, Nq - num_cached + T, Nq + T); B is text_mask's batch, else `batch_size`.
    The bidirectional mask is a stride-0 expand of a key-padding mask, which lets `attend()` use
    flash-attn's padded kernel for it.
    """
    if kind not in QFORMER_MASKS:
        raise ValueError(f"Q-Former mask kind {kind!r} is not one of {', '.join(QFORMER_MASKS)}")
    if not 0 <= num_cached <= num_queries:
        raise ValueError(f"num_cached={num_cached} must lie in [0, num_queries={num_queries}]")
    if text_mask is not None:
        batch_size, device = text_mask.size(0), text_mask.device
        text_valid = text_mask.bool()
    else:
        text_valid = torch.ones(batch_size, 0, dtype=torch.bool, device=device)
    query_valid = torch.ones(batch_size, num_queries, dtype=torch.bool, device=device)
    key_valid = torch.cat([query_valid, text_valid], dim=1)  # (B, Nq + T)
    total = key_valid.size(1)
    rows = total - num_cached
    if kind == "bidirectional":
        return key_valid[:, None, None, :].expand(batch_size, 1, rows, total)

    pos = torch.arange(total, device=device)
    is_query = pos < num_queries
    row_pos, row_is_query = pos[num_cached:, None], is_query[num_cached:, None]  # (rows, 1)
    col_pos, col_is_query = pos[None, :], is_query[None, :]  # (1, Nq + T)
    if kind == "unimodal":
        allowed = row_is_query == col_is_query
    else:  # causal: query columns for everyone; text rows also see text columns up to themselves
        allowed = col_is_query | (~row_is_query & (col_pos <= row_pos))
    return allowed[None, None] & key_valid[:, None, None, :]  # (B, 1, rows, Nq + T)
