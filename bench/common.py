"""Timing, sizes and small helpers shared by the stage-1 and stage-2 benchmarks.

Timings are taken side by side in one process: the functions under comparison alternate within
every repetition (A B, then B A, ...), so load from other processes and clock drift hit both alike;
what the table reports is the median of the repetitions.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch import nn

from blip_train.config.schema import ModelConfig, QFormerConfig, VisionConfig
from blip_train.models.attention import check_backend


@dataclass
class Preset:
    """One benchmark size: our model config, the batch, and the stage-2 LLM shape (OPT-like)."""
    name: str
    model: ModelConfig
    batch_size: int
    text_len: int
    llm: dict
    """OPTConfig keyword arguments of the frozen stage-2 LLM."""


def small_preset() -> Preset:
    """CPU size: each compared step takes 0.1-1 s on one core, with every part of the real model present.

    ViT 112 px / patch 16 (50 tokens), width 256, 4 blocks; Q-Former width 256, 4 layers, 16 queries,
    BERT's vocabulary; OPT-like LLM width 384, 4 layers, vocab 8192. Dropout 0 on both sides so the
    losses can be compared (the work per step is the same with dropout).
    """
    vision = VisionConfig(image_size=112, patch_size=16, width=256, layers=5, drop_last_block=True, heads=4,
                          mlp_dim=1024, precision="fp32")
    qformer = QFormerConfig(hidden_size=256, layers=4, heads=4, intermediate_size=1024, vocab_size=30523,
                            max_position_embeddings=64, cross_attention_freq=2, num_query_tokens=16, dropout=0.0)
    model = ModelConfig(embed_dim=256, max_txt_len=24, attention="auto", vision=vision, qformer=qformer)
    llm = dict(vocab_size=8192, hidden_size=384, num_hidden_layers=4, ffn_dim=1536, num_attention_heads=6,
               max_position_embeddings=128, word_embed_proj_dim=384)
    return Preset("small", model, batch_size=8, text_len=24, llm=llm)


def gpu_preset() -> Preset:
    """GPU size: the paper's ViT-g/14 (39 of 40 blocks, 224 px) and BERT-base Q-Former (32 queries),
    batch 32 per GPU, captions of 32 tokens; stage 2 with an OPT-1.3B-shaped frozen LLM."""
    model = ModelConfig(embed_dim=256, max_txt_len=32, attention="auto",
                        vision=VisionConfig(precision="bf16"), qformer=QFormerConfig(dropout=0.0))
    llm = dict(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
               max_position_embeddings=2048, word_embed_proj_dim=2048)
    return Preset("gpu", model, batch_size=32, text_len=32, llm=llm)


PRESETS: dict[str, Callable[[], Preset]] = {"small": small_preset, "gpu": gpu_preset}


def with_batch(preset: Preset, batch_size: int) -> Preset:
    return replace(preset, batch_size=batch_size)


def set_attention_(model: nn.Module, backend: str) -> None:
    """Switch every attention of our model (ViT and Q-Former) to `backend` (auto | flash | sdpa | math)."""
    check_backend(backend)
    for m in model.modules():
        if isinstance(getattr(m, "attention", None), str):
            m.attention = backend


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_side_by_side(fns: dict[str, Callable[[], object]], warmup: int, reps: int,
                      sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating their order every repetition."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def train_step_fn(model: nn.Module, loss_fn: Callable[[], torch.Tensor], seed: int = 1234) -> Callable[[], float]:
    """forward + backward of `loss_fn` from zeroed gradients, with torch's RNG reset first, so both
    sides draw the same ITM hard negatives. Returns the loss (read after the timed work)."""
    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = loss_fn()
        loss.backward()
        return loss.detach()
    return step


def freeze_except_(module: nn.Module, trainable_prefixes: tuple[str, ...]) -> None:
    """requires_grad False everywhere but on parameters whose name starts with one of the prefixes."""
    for name, p in module.named_parameters():
        p.requires_grad_(name.startswith(trainable_prefixes))


@contextmanager
def count_attention_backends() -> Iterator[Counter]:
    """Tally the backend `attend()` resolves for each call made inside the block (what really ran,
    per call: flash needs CUDA, 16-bit tensors and a mask it can express)."""
    from blip_train.models import attention

    tally: Counter = Counter()
    original = attention.resolve_backend

    def counting(*args, **kwargs) -> str:
        chosen = original(*args, **kwargs)
        tally[chosen] += 1
        return chosen

    attention.resolve_backend = counting
    try:
        yield tally
    finally:
        attention.resolve_backend = original


def print_markdown_table(rows: list[list[str]]) -> None:
    """rows[0] is the header; the first column left-aligned, the others right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
              + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
