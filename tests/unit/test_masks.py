"""Each mask against its definition, element by element."""
from __future__ import annotations

import itertools

import pytest
import torch

from blip_train.models.attention import is_key_padding_mask
from blip_train.models.masks import causal_mask, padding_mask, qformer_self_attention_mask

TEXT_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
NQ = 3


def allowed(kind: str, row: int, col: int, nq: int, text_valid: list[bool]) -> bool:
    """The paper's definition, written out: row/col index [queries; text]."""
    if col >= nq and not text_valid[col - nq]:
        return False  # padding keys are never attended to
    row_q, col_q = row < nq, col < nq
    if kind == "bidirectional":
        return True
    if kind == "unimodal":
        return row_q == col_q
    # causal: queries see queries; text sees all queries and text up to itself
    return col_q if row_q else (col_q or col <= row)


def test_padding_mask():
    m = padding_mask(TEXT_MASK)
    assert m.shape == (3, 1, 1, 4) and m.dtype == torch.bool
    assert torch.equal(m[:, 0, 0], TEXT_MASK.bool())


def test_causal_mask():
    m = causal_mask(5)
    assert m.shape == (1, 1, 5, 5)
    for i, j in itertools.product(range(5), range(5)):
        assert bool(m[0, 0, i, j]) == (j <= i)


@pytest.mark.parametrize("kind", ["unimodal", "bidirectional", "causal"])
@pytest.mark.parametrize("num_cached", [0, NQ])
def test_qformer_masks_follow_definition(kind, num_cached):
    m = qformer_self_attention_mask(kind, NQ, TEXT_MASK, num_cached=num_cached)
    t = TEXT_MASK.size(1)
    assert m.shape == (3, 1, NQ + t - num_cached, NQ + t) and m.dtype == torch.bool
    for b in range(3):
        valid = TEXT_MASK[b].bool().tolist()
        for r, c in itertools.product(range(m.size(2)), range(m.size(3))):
            assert bool(m[b, 0, r, c]) == allowed(kind, r + num_cached, c, NQ, valid), (kind, b, r, c)


def test_bidirectional_is_a_key_padding_mask_and_others_are_not():
    assert is_key_padding_mask(qformer_self_attention_mask("bidirectional", NQ, TEXT_MASK))
    assert not is_key_padding_mask(qformer_self_attention_mask("causal", NQ, TEXT_MASK))


def test_queries_only_and_text_only():
    q_only = qformer_self_attention_mask("unimodal", NQ, None, batch_size=2)
    assert q_only.shape == (2, 1, NQ, NQ) and q_only.all()
    text_only = qformer_self_attention_mask("causal", 0, TEXT_MASK)
    torch.testing.assert_close(text_only, causal_mask(4) & padding_mask(TEXT_MASK))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="kind"):
        qformer_self_attention_mask("prefix", NQ, TEXT_MASK)
    with pytest.raises(ValueError, match="num_cached"):
        qformer_self_attention_mask("causal", NQ, TEXT_MASK, num_cached=NQ + 1)
