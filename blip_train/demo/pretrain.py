"""Honest, short pretraining of the demo's tiny frozen towers, saved in the formats real ones come in.

Real BLIP-2 runs freeze towers that were pretrained elsewhere (EVA-CLIP, OPT, FlanT5). A frozen
*random* tower carries little usable signal, so the demo first trains its tiny towers on the
synthetic training split only (never on val), then the stages load them through the same code paths
as real weights: the ViT from a safetensors file in our names, LLMs from HF folders.

ViT objective: weakly supervised tagging — predict which words of the image's caption occur
(multi-label, binary cross-entropy), the kind of signal web alt-text gives real towers.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from streaming import StreamingDataset
from torch import nn

from blip_train.config import VisionConfig
from blip_train.data.transforms import build_transform
from blip_train.models.eva_vit import EVAViT


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def load_split_for_pretraining(split_dir: str, image_size: int, limit: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Decode a (small) MDS split into memory: images (N,3,S,S) normalised, and their captions."""
    ds = StreamingDataset(local=split_dir, shuffle=False, batch_size=1)
    tf = build_transform(image_size, False)
    n = ds.num_samples if not limit else min(limit, ds.num_samples)  # all samples, not a rank's share
    images, captions = [], []
    for i in range(n):
        s = ds[i]
        images.append(tf(s["image"]))
        captions.append(s["caption"])
    return torch.stack(images), captions


class _Tagger(nn.Module):
    def __init__(self, vit: EVAViT, width: int, vocab: int):
        super().__init__()
        self.vit = vit
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(x)                      # (B, 1+N, W)
        return self.head(self.norm(tokens.mean(1)))  # (B, V)


def pretrain_vit(vcfg: VisionConfig, train_split: str, out_file: Path, steps: int = 300, batch_size: int = 64,
                 lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train EVAViT(vcfg) to tag caption words; save the tower's weights (our names) as safetensors."""
    torch.manual_seed(seed)
    images, captions = load_split_for_pretraining(train_split, vcfg.image_size)
    vocab = sorted({w for c in captions for w in _words(c)})
    index = {w: i for i, w in enumerate(vocab)}
    targets = torch.zeros(len(captions), len(vocab))
    for row, c in enumerate(captions):
        for w in _words(c):
            targets[row, index[w]] = 1.0
    model = _Tagger(EVAViT(vcfg, attention="sdpa"), vcfg.width, len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0, first, last = time.time(), None, None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = images[idx]  # no flips: captions name left/right positions
        loss = F.binary_cross_entropy_with_logits(model(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        first = first if first is not None else loss.item()
        last = loss.item()
        if step % 50 == 0 or step == steps:
            log(f"  vit pretrain step {step}/{steps} tag-loss {last:.4f} ({time.time() - t0:.0f}s)")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.vit.state_dict().items()}, str(tmp))
    tmp.replace(out_file)
    return {"steps": steps, "initial_loss": first, "final_loss": last, "vocab": len(vocab), "file": str(out_file)}
