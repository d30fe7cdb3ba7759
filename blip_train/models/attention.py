"""The one attention function every self- and cross-attention in blip-train calls.

`attend(q, k, v, mask, backend=...)` hides three implementations behind one contract:

- `flash`: the flash-attn package (CUDA, fp16/bf16 only). It cannot take an arbitrary boolean mask,
  so it is used for unmasked calls (`flash_attn_func`) and for pure key-padding masks
  (`flash_attn_varlen_func` over the unpadded keys). Any other mask, or fp32 tensors, run SDPA for
  that call: the model-level choice is a preference, the mask and dtype are facts of each call.
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (flash / efficient / cuDNN kernels on
  GPU, math on CPU).
- `math`: explicit softmax(Q K^T / sqrt(Dh)) V with the softmax in float32; the readable reference.

Mask convention everywhere: boolean, broadcastable to (B, H, Tq, Tk), True = may attend. A mask
whose row dimension is 1 or a stride-0 broadcast (see `masks.py`) is a pure key-padding mask.
A query row with no allowed key returns zeros (not NaN), with zero gradient.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "math")
_FLASH_INSTALL_HINT = ("flash-attn is an optional extra: install it with `pip install -e '.[flash]'` "
                       "(a CUDA source build), or set model.attention to sdpa or auto")


def flash_available() -> bool:
    """True when the flash-attn package can be imported (it is never a hard dependency)."""
    return importlib.util.find_spec("flash_attn") is not None


def check_backend(requested: str) -> None:
    """Validate a `model.attention` value at model construction, before any tensor exists.

    Fails early when `flash` is requested but flash-attn is not installed; the CUDA requirement is
    checked per call because modules are usually built on CPU and moved later.
    """
    if requested not in BACKENDS:
        raise ValueError(f"model.attention={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "flash" and not flash_available():
        raise RuntimeError(f"model.attention=flash but flash_attn cannot be imported: {_FLASH_INSTALL_HINT}")


def is_key_padding_mask(mask: torch.Tensor) -> bool:
    """True when every query row of `mask` is the same row, so the mask only says which keys exist.

    Checked from the shape and strides (no device sync): (B, 1, 1, Tk), or a stride-0 expand of it.
    """
    return mask.dim() == 4 and mask.size(1) == 1 and (mask.size(2) == 1 or mask.stride(2) == 0)


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype,
                    mask: Optional[torch.Tensor] = None) -> str:
    """The backend one call will use: `flash`, `sdpa` or `math`.

    auto -> flash when flash-attn is importable, the tensors are on CUDA in fp16/bf16 and the mask is
    None or key padding; otherwise sdpa. An explicit `flash` raises off CUDA or without flash-attn,
    and runs sdpa for calls flash cannot express (fp32, general masks).
    """
    if requested not in BACKENDS:
        raise ValueError(f"model.attention={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested in ("sdpa", "math"):
        return requested
    on_cuda = torch.device(device).type == "cuda"
    if requested == "flash":
        if not flash_available():
            raise RuntimeError(f"model.attention=flash but flash_attn cannot be imported: {_FLASH_INSTALL_HINT}")
        if not on_cuda:
            raise RuntimeError(f"model.attention=flash needs CUDA tensors, got device {device}; "
                               "use model.attention=auto or sdpa on CPU")
    elif not (on_cuda and flash_available()):
        return "sdpa"
    expressible = mask is None or is_key_padding_mask(mask)
    return "flash" if dtype in (torch.float16, torch.bfloat16) and expressible else "sdpa"


def _mask_with_live_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Open up fully masked rows so no kernel sees an all -inf row (NaN in forward and backward).

    Returns the mask to use and `live` (..., Tq, 1): False for rows whose output must be zeroed.
    """
    live = mask.any(dim=-1, keepdim=True)  # (B|1, 1, Tq, 1)
    return mask | ~live, live


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    dropout_p: float) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.size(-1))
    # Scores in the input dtype, softmax in float32: fp16 logits overflow exp() long before the
    # matmul itself loses precision.
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)  # (B, H, Tq, Dh)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    b, h, tq, dh = q.shape
    tk = k.size(2)
    # flash-attn wants (B, T, H, Dh).
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if mask is None:
        return flash_attn_func(qt, kt, vt, dropout_p=dropout_p).transpose(1, 2)  # (B, H, Tq, Dh)
    key_valid = mask[:, 0, 0, :].expand(b, tk)  # (B, Tk)
    key_lens = key_valid.sum(dim=-1, dtype=torch.int32)  # (B,)
    cu_k = F.pad(key_lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
    keep = key_valid.reshape(-1).nonzero().squeeze(1)  # indices into B*Tk
    k_packed = kt.reshape(b * tk, h, dh).index_select(0, keep)  # (sum(key_lens), H, Dh)
    v_packed = vt.reshape(b * tk, h, dh).index_select(0, keep)
    # Every query row is kept (only keys are padding), so queries pack as B blocks of Tq.
    cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(qt.reshape(b * tq, h, dh), k_packed, v_packed, cu_q, cu_k, tq,
                                 int(key_lens.max()), dropout_p=dropout_p)  # (B*Tq, H, Dh)
    out = out.reshape(b, tq, h, dh).transpose(1, 2)  # (B, H, Tq, Dh)
    # A sequence without any key has no defined output: zeros, as the other backends.
    return out * (key_lens > 0).view(b, 1, 1, 1).to(out.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], *,
           backend: str, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with scale 1/sqrt(Dh).

    q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh); mask: bool broadcastable to (B, H, Tq, Tk), True = may
    attend, or None. `dropout_p` applies to the attention probabilities only when `training`.
    Returns (B, H, Tq, Dh) in the dtype of v.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be boolean (True = may attend), got {mask.dtype}")
    p = dropout_p if training else 0.0
    chosen = resolve_backend(backend, q.device, q.dtype, mask)
    if chosen == "flash":
        return _flash_attention(q, k, v, mask, p)
    live = None
    if mask is not None:
        mask, live = _mask_with_live_rows(mask)
    if chosen == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    else:
        out = _math_attention(q, k, v, mask, p)
    if live is not None:
        out = out * live.to(out.dtype)  # zero the rows that had no key to attend to
    return out
