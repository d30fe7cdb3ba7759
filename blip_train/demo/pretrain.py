"""Honest, short pretraining of the demo's tiny frozen towers, saved in the formats real ones come in.

Real BLIP-2 runs freeze towers that were pretrained elsewhere (EVA-CLIP, OPT, FlanT5). A frozen
*random* tower carries little usable signal, so the demo first trains its tiny towers on the
synthetic training split only (never on val), then the stages load them through the same code paths
as real weights: the ViT from a safetensors file in our names, LLMs from HF folders.

Objective (the ViT and the 3D stage's Point-BERT): weakly supervised tagging — predict which words of the
input's caption occur (multi-label, binary cross-entropy), the kind of signal web alt-text gives real towers.
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
    def __init__(self, tower: nn.Module, width: int, vocab: int):
        super().__init__()
        self.tower = tower
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tower(x)                       # (B, 1+N, W)
        return self.head(self.norm(tokens.mean(1)))  # (B, V)


def train_tagger(tower: nn.Module, width: int, inputs: torch.Tensor, captions: list[str], steps: int,
                 batch_size: int, lr: float, seed: int, log, name: str) -> dict:
    """Train `tower` (in place) to tag which words of each input's caption occur, from the mean of its tokens;
    returns the first and last loss and the tag vocabulary's size. The head is initialised from torch's global
    generator (the caller seeds it before building the tower); batches are drawn from `seed`."""
    vocab = sorted({w for c in captions for w in _words(c)})
    index = {w: i for i, w in enumerate(vocab)}
    targets = torch.zeros(len(captions), len(vocab))
    for row, c in enumerate(captions):
        for w in _words(c):
            targets[row, index[w]] = 1.0
    model = _Tagger(tower, width, len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0, first, last = time.time(), None, None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=g)
        loss = F.binary_cross_entropy_with_logits(model(inputs[idx]), targets[idx])  # no flips: captions name sides
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        first = first if first is not None else loss.item()
        last = loss.item()
        if step % 50 == 0 or step == steps:
            log(f"  {name} pretrain step {step}/{steps} tag-loss {last:.4f} ({time.time() - t0:.0f}s)")
    tower.eval()
    return {"steps": steps, "initial_loss": first, "final_loss": last, "vocab": len(vocab)}


def pretrain_vit(vcfg: VisionConfig, train_split: str, out_file: Path, steps: int = 300, batch_size: int = 64,
                 lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train EVAViT(vcfg) to tag caption words; save the tower's weights (our names) as safetensors."""
    torch.manual_seed(seed)
    images, captions = load_split_for_pretraining(train_split, vcfg.image_size)
    vit = EVAViT(vcfg, attention="sdpa")
    summary = train_tagger(vit, vcfg.width, images, captions, steps, batch_size, lr, seed, log, "vit")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp))
    tmp.replace(out_file)
    return {**summary, "file": str(out_file)}


def pretrain_point_bert(shape, train_split: str, out_folder: Path, steps: int = 300, batch_size: int = 64,
                        lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train PointEncoder(shape) to tag the words of each cloud's caption (ULIP-2 pretrains Point-BERT against
    CLIP's image and text features; word tags are the tiny analogue); save it as a tower folder."""
    from blip_train.data.points import decode_points
    from blip_train.models.point_encoder import PointEncoder, save_point_encoder

    ds = StreamingDataset(local=train_split, shuffle=False, batch_size=1)
    clouds, captions, seen = [], [], set()
    for i in range(ds.num_samples):
        row = ds[i]
        if row["image_id"] not in seen:  # a cloud's question rows share it
            seen.add(row["image_id"])
            clouds.append(torch.from_numpy(decode_points(row).copy()))
            captions.append(row["caption"])
    torch.manual_seed(seed)
    encoder = PointEncoder(shape)
    summary = train_tagger(encoder, shape.trans_dim, torch.stack(clouds), captions, steps, batch_size, lr, seed,
                           log, "point-bert")
    tmp = out_folder.with_name(out_folder.name + ".tmp")
    save_point_encoder(encoder, tmp)
    tmp.replace(out_folder)
    return {**summary, "clouds": len(clouds), "folder": str(out_folder)}
