"""`make scale`'s inputs: random towers at the real dimensions, saved in the formats real weights come in, and
the small synthetic data split."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from bench.scale.model import GIB, LAYER_KEYS, LLMS, Recipe, model_config

TIMM_VITS = {"b16": "deit_base_patch16_224.pth", "l16": "vit_large_patch16_224_in21k.pth"}
"""The ImageNet checkpoints BLIP / ALBEF start from (the recipes' model.vision.weights), by Recipe.vit."""
TIMM_CLASSES = 1000
"""The classifier head written with them (ImageNet-1k; an in21k checkpoint has 21,843: dropped on load either way)."""


def timm_vit_state_dict(vision) -> dict:
    """Random weights of an ImageNet timm ViT/DeiT at 224 px, in the layout timm saves (fp32, a full
    `attn.qkv.bias` per block, a `head.*` classifier), shaped from EVAViT(`vision`): load_vit_weights drops the
    head, splits the bias and interpolates the position embeddings to the recipe's image size."""
    import dataclasses

    import torch

    from blip_train.models.eva_vit import EVAViT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in EVAViT(dataclasses.replace(vision, image_size=224)).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        if k.endswith(".attn.v_bias"):
            continue  # the last third of qkv.bias
        if k.endswith(".attn.q_bias"):
            sd[k[: -len("q_bias")] + "qkv.bias"] = torch.zeros(3 * shape[0])  # (3D,): q, k, v
            continue
        t = torch.empty(shape)
        t.normal_(0.0, 0.02) if len(shape) >= 2 or k in ("cls_token", "pos_embed") else (
            t.zero_() if "bias" in k else t.fill_(1.0))
        sd[k] = t
    sd["head.weight"] = torch.empty(TIMM_CLASSES, vision.width).normal_(0.0, 0.02)
    sd["head.bias"] = torch.zeros(TIMM_CLASSES)
    return sd


def build_hf_llm(name: str, layers: Optional[int], meta: bool = False, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, OPTConfig, T5Config

    spec = dict(LLMS[name])
    family = spec.pop("family")
    if layers is not None:
        for key in LAYER_KEYS[family]:
            spec[key] = layers
    cfg = {"opt": OPTConfig, "llama": LlamaConfig, "t5": T5Config}[family](**spec)
    if family == "opt":
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 2, 2, 1
    elif family == "llama":
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 3
    else:
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = 0, 1, 0
    cls = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(cfg, dtype=dtype or torch.bfloat16)
    if not meta:
        model.to_empty(device="cpu")
        fill_random_(model)
    return model


def fill_random_(module) -> None:
    """Weights drawn as a trained model's look (normal 0.02), norms at one, biases at zero: in place, bf16."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def save_random_hf_folder(name: str, layers: Optional[int], folder: Path, dtype, shard_bytes: int = 2 * GIB) -> None:
    """An HF folder (config.json, sharded model-*.safetensors + index) of random weights, written tensor by
    tensor: a 13B model never exists whole in memory. Tied weights are written once, as save_pretrained does."""
    import torch
    from safetensors.torch import save_file

    model = build_hf_llm(name, layers, meta=True, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    shards: list[dict] = [{}]
    size = 0
    for key, p in model.named_parameters():  # shared parameters once, under their first name
        nbytes = p.numel() * p.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = p
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, p in shard.items():
            t = torch.empty(p.shape, dtype=dtype)
            if t.ndim >= 2:
                t.normal_(0.0, 0.02)
            else:
                t.zero_() if key.endswith("bias") else t.fill_(1.0)
            tensors[key] = t
            weight_map[key] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def texts_for_tokenizers() -> list[str]:
    words = ("a photo of a red square next to two small blue circles on the left of a green triangle "
             "question answer what color shape how many is there short the image shows").split()
    return [" ".join(words[i:i + 7]) for i in range(len(words) - 6)] * 4


def make_towers(towers: Path, recipe: Recipe, log) -> dict:
    """The recipe's towers under `towers`, in their release formats; built once and reused."""
    import torch
    from safetensors.torch import save_file

    from blip_train.data.tokenizers import train_bpe_tokenizer, train_wordpiece_tokenizer
    from blip_train.models.eva_vit import EVAViT

    out: dict = {}
    m = model_config(recipe.name)
    vit_file = towers / TIMM_VITS.get(recipe.vit, "eva_vit_g.pth" if recipe.vit == "g" else "vit_l.safetensors")
    if recipe.vit in TIMM_VITS and not vit_file.exists():
        t0 = time.time()
        sd = timm_vit_state_dict(m.vision)
        vit_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = vit_file.with_suffix(".tmp")
        torch.save({"model": sd}, tmp)  # as timm / DeiT release them
        tmp.replace(vit_file)
        log(f"towers: {vit_file.name} ({vit_file.stat().st_size / GIB:.2f} GiB) in {time.time() - t0:.0f}s")
        del sd
    elif not vit_file.exists():
        t0 = time.time()
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in EVAViT(m.vision).state_dict().items()}
        sd = {}
        for k, shape in shapes.items():  # fp16 as LAVIS ships eva_vit_g.pth
            t = torch.empty(shape, dtype=torch.float16)
            t.normal_(0.0, 0.02) if len(shape) >= 2 or k in ("cls_token", "pos_embed") else (
                t.zero_() if "bias" in k else t.fill_(1.0))
            sd[k] = t
        vit_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = vit_file.with_suffix(".tmp")
        if vit_file.suffix == ".pth":
            torch.save({"model": sd}, tmp)
        else:
            save_file(sd, str(tmp))
        tmp.replace(vit_file)
        log(f"towers: {vit_file.name} ({vit_file.stat().st_size / GIB:.2f} GiB) in {time.time() - t0:.0f}s")
        del sd
    out["vit"] = vit_file
    bert = towers / "bert-base-uncased"
    if not (bert / "model.safetensors").exists():
        from transformers import BertConfig, BertForMaskedLM
        train_wordpiece_tokenizer(texts_for_tokenizers(), vocab_size=200, out_dir=bert)
        with torch.device("meta"):
            model = BertForMaskedLM(BertConfig())  # bert-base-uncased: 12 x 768, vocab 30522
        model.to_empty(device="cpu")
        fill_random_(model)
        model.save_pretrained(str(bert), safe_serialization=True)
        log(f"towers: random bert-base-uncased → {bert}")
    out["bert"] = bert
    if recipe.llm is not None:
        suffix = f"-{recipe.llm_layers}layers" if recipe.llm_layers is not None else ""
        folder = towers / f"{recipe.llm}{suffix}"
        if not (folder / ".complete").exists():
            t0 = time.time()
            family = LLMS[recipe.llm]["family"]
            save_random_hf_folder(recipe.llm, recipe.llm_layers, folder,
                                  torch.float32 if m.llm.dtype == "fp32" else torch.bfloat16)
            train_bpe_tokenizer(texts_for_tokenizers(), vocab_size=300, out_dir=folder, style=family)
            (folder / ".complete").write_text("")
            log(f"towers: random {recipe.llm}{suffix} → {folder} in {time.time() - t0:.0f}s")
        out["llm"] = folder
    if recipe.encoder is not None:
        out["encoder"] = make_encoder(towers, recipe.encoder, log)
    return out


def make_encoder(towers: Path, name: str, log) -> Path:
    """X-InstructBLIP's frozen tower at its real size, random, as its release comes: an ASTModel folder (with its
    feature extractor's config) or a Point-BERT folder (what tools/import_ulip2_pointbert.py writes)."""
    import torch

    from bench.scale.model import AST_AUDIOSET, build_encoder
    from blip_train.models.point_encoder import save_point_encoder

    folder = towers / ("ast-audioset" if name == "ast" else "ulip2_pointbert")
    if (folder / ".complete").exists():
        return folder
    t0 = time.time()
    torch.manual_seed(0)
    encoder = build_encoder(name)
    if name == "ast":
        from transformers import ASTFeatureExtractor
        encoder.ast.save_pretrained(str(folder), safe_serialization=True)
        ASTFeatureExtractor(num_mel_bins=AST_AUDIOSET["num_mel_bins"],
                            max_length=AST_AUDIOSET["max_length"]).save_pretrained(str(folder))
    else:
        save_point_encoder(encoder, folder)
    (folder / ".complete").write_text("")
    log(f"towers: random {folder.name} → {folder} in {time.time() - t0:.0f}s")
    return folder


def make_modality_data(root: Path, encoder: str) -> Path:
    """The small split an X-InstructBLIP recipe reads: 4-s tones (audio) or solids of 8,192 points (3D)."""
    if encoder == "ast":
        from blip_train.data.synthetic_audio import write_synthetic_audio_dataset
        data = root / "data_audio"
        if not (data / "val").is_dir():
            write_synthetic_audio_dataset(data, num_samples=40, seconds=4.0, val_fraction=0.25, overwrite=True)
        return data
    from blip_train.data.synthetic_points import write_synthetic_points_dataset
    data = root / "data_points"
    if not (data / "val").is_dir():
        write_synthetic_points_dataset(data, num_clouds=12, num_points=8192, val_fraction=0.25, overwrite=True)
    return data


def make_data(root: Path) -> Path:
    from blip_train.data.synthetic import write_synthetic_dataset
    data = root / "data"
    if not (data / "val").is_dir():
        write_synthetic_dataset(data, num_samples=80, seed=0, val_fraction=0.25, image_size=224, overwrite=True)
    return data

