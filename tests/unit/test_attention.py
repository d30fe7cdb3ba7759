"""attend(): every backend against a float64 reference, masks, fully masked rows, backend choice."""
from __future__ import annotations

import math

import pytest
import torch

from blip_train.models import attention
from blip_train.models.attention import attend, check_backend, is_key_padding_mask, resolve_backend
from blip_train.models.masks import causal_mask, padding_mask

CPU_BACKENDS = ["sdpa", "math"]


def reference(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v in float64; rows without any allowed key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if mask is not None:
        mask = mask.expand_as(scores)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def qkv(b=2, h=3, tq=5, tk=5, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(dtype) for t in (tq, tk, tk)]


def _masks(b, tq, tk):
    lengths = torch.tensor([tk, max(1, tk - 2)])[:b]
    pad = torch.arange(tk)[None, :] < lengths[:, None]  # (B, Tk)
    yield "none", None
    yield "padding", padding_mask(pad)
    if tq == tk:
        yield "causal", causal_mask(tk)
        yield "causal+padding", causal_mask(tk) & padding_mask(pad)
    general = torch.rand(b, 1, tq, tk, generator=torch.Generator().manual_seed(1)) > 0.4
    yield "general", general


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(5, 5), (4, 9)], ids=["self", "cross"])
def test_backends_match_float64_reference(backend, shape):
    tq, tk = shape
    q, k, v = qkv(tq=tq, tk=tk)
    for name, mask in _masks(2, tq, tk):
        out = attend(q, k, v, mask, backend=backend)
        assert out.shape == q.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_are_zero_without_nan(backend):
    q, k, v = qkv(tq=4, tk=6)
    for t in (q, k, v):
        t.requires_grad_(True)
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[0, 0, 1] = False  # one query row with nothing to attend to
    mask[1] = False  # a whole sample without keys
    out = attend(q, k, v, mask, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[0, :, 1] == 0).all() and (out[1] == 0).all()
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all()


def test_backends_agree_on_gradients():
    grads = []
    for backend in CPU_BACKENDS:
        q, k, v = (t.requires_grad_(True) for t in qkv())
        attend(q, k, v, causal_mask(5), backend=backend).square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_only_in_training(backend):
    q, k, v = qkv()
    base = attend(q, k, v, None, backend=backend)
    torch.testing.assert_close(attend(q, k, v, None, backend=backend, dropout_p=0.5, training=False), base)
    torch.manual_seed(0)
    assert not torch.allclose(attend(q, k, v, None, backend=backend, dropout_p=0.5, training=True), base)


def test_math_backend_half_precision_stays_finite():
    q, k, v = qkv(dtype=torch.bfloat16)
    out = attend(q * 30, k * 30, v, causal_mask(5), backend="math")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_non_boolean_mask_is_refused():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="boolean"):
        attend(q, k, v, torch.ones(1, 1, 5, 5), backend="sdpa")


def test_flash_on_cpu_raises_clear_error(monkeypatch):
    q, k, v = qkv(dtype=torch.bfloat16)
    monkeypatch.setattr(attention, "flash_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"model\.attention.*pip install -e '\.\[flash\]'"):
        attend(q, k, v, None, backend="flash")
    with pytest.raises(RuntimeError, match=r"model\.attention"):
        check_backend("flash")
    monkeypatch.setattr(attention, "flash_available", lambda: True)  # installed, but no CUDA
    with pytest.raises(RuntimeError, match=r"model\.attention=flash needs CUDA"):
        attend(q, k, v, None, backend="flash")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="model.attention"):
        check_backend("xformers")


def test_resolve_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_backend("math", cuda, torch.float16) == "math"
    pad = padding_mask(torch.tensor([[1, 1, 0]]))
    general = causal_mask(3)
    monkeypatch.setattr(attention, "flash_available", lambda: False)
    assert resolve_backend("auto", cuda, torch.float16) == "sdpa"
    monkeypatch.setattr(attention, "flash_available", lambda: True)
    assert resolve_backend("auto", cuda, torch.float16) == "flash"
    assert resolve_backend("auto", cuda, torch.bfloat16, pad.expand(1, 1, 3, 3)) == "flash"
    assert resolve_backend("auto", cuda, torch.bfloat16, general) == "sdpa"
    assert resolve_backend("auto", cuda, torch.float32) == "sdpa"
    assert resolve_backend("auto", cpu, torch.float16) == "sdpa"
    assert resolve_backend("flash", cuda, torch.float16, general) == "sdpa"  # flash cannot express it


def test_key_padding_detection():
    pad = padding_mask(torch.tensor([[1, 0], [1, 1]]))  # (2, 1, 1, 2)
    assert is_key_padding_mask(pad) and is_key_padding_mask(pad.expand(2, 1, 4, 2))
    assert not is_key_padding_mask(causal_mask(2))
    assert not is_key_padding_mask(pad.expand(2, 1, 4, 2).contiguous())


@pytest.mark.gpu
def test_cuda_backends_agree():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v = (t.cuda() for t in qkv(b=2, h=4, tq=64, tk=64, d=64, dtype=torch.bfloat16))
    pad = padding_mask(torch.arange(64, device="cuda")[None] < torch.tensor([[64], [40]], device="cuda"))
    for mask in (None, pad, pad.expand(2, 1, 64, 64), causal_mask(64, device="cuda")):
        want = reference(q, k, v, mask).float()
        for backend in ("auto", "sdpa", "math"):
            torch.testing.assert_close(attend(q, k, v, mask, backend=backend).float(), want, atol=2e-2, rtol=0)
    if not attention.flash_available():
        pytest.skip("flash-attn not installed (pip install -e '.[flash]')")
    for mask in (None, pad, pad.expand(2, 1, 64, 64)):
        torch.testing.assert_close(attend(q, k, v, mask, backend="flash").float(),
                                   attend(q, k, v, mask, backend="sdpa").float(), atol=2e-2, rtol=0)
