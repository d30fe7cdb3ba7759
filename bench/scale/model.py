"""`make scale`'s model of the recipes: which it covers, their parameter counts read off the real configs on
the meta device, the analytic minimum memory per rank, and the plan of what fits this machine."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

GIB = 2**30
BYTES_PER_TRAINABLE = 2 + 2 + 4 + 4 + 8
"""bf16 weight + bf16 gradient + fp32 master + fp32 gradient partition + Adam's two fp32 moments."""
TARGET_RATIO = 1.3
WORLD = 2
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Public configurations of the released models (facts; the weights here are random).
LLMS = {
    "opt-2.7b": dict(family="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560),
    "opt-6.7b": dict(family="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096),
    "flan-t5-xl": dict(family="t5", d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                       num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False),
    "flan-t5-xxl": dict(family="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                        num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False),
    "vicuna-7b": dict(family="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=2048, rms_norm_eps=1e-6),
    "vicuna-13b": dict(family="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       max_position_embeddings=2048, rms_norm_eps=1e-6),
}
LAYER_KEYS = {"opt": ("num_hidden_layers",), "llama": ("num_hidden_layers",), "t5": ("num_layers", "num_decoder_layers")}


@dataclass
class Recipe:
    name: str
    vit: str
    """g | l: EVA ViT-g/14, CLIP ViT-L/14 (BLIP-2, frozen); b16 | l16: timm ViT-B/16, ViT-L/16 (BLIP / ALBEF,
    trained from an ImageNet checkpoint)."""
    llm: Optional[str] = None
    paper_trainable: float = 188e6
    """Trainable parameters the paper reports (the Q-Former with its queries, 188M; + ViT-g when fine-tuning), or
    our exact count where the paper gives none to compare (see RECIPES)."""
    llm_layers: Optional[int] = None
    """LLM layers built here (None: all); set when the full size cannot fit this machine."""
    encoder: Optional[str] = None
    """X-InstructBLIP's other modalities: ast | point_bert, the frozen tower in the ViT's place (model.modality
    audio | 3d); None: the ViT."""


RECIPES = [
    Recipe("blip2_stage1_vitg", "g"),
    Recipe("blip2_stage1_vitl", "l"),
    Recipe("blip2_stage2_opt2.7b", "g", "opt-2.7b"),
    Recipe("blip2_stage2_flant5xl", "g", "flan-t5-xl"),
    Recipe("instructblip_flant5xl", "g", "flan-t5-xl"),
    Recipe("instructblip_vicuna7b", "g", "vicuna-7b"),
    Recipe("blip2_stage2_opt6.7b", "g", "opt-6.7b"),
    Recipe("blip2_stage2_flant5xxl", "g", "flan-t5-xxl"),
    Recipe("instructblip_flant5xxl", "g", "flan-t5-xxl"),
    Recipe("instructblip_vicuna13b", "g", "vicuna-13b"),
    # Fine-tuning trains the ViT too (1B more trainable parameters at 20 bytes each).
    Recipe("blip2_ft_retrieval_coco_vitg", "g", paper_trainable=1.17e9),
    Recipe("blip2_ft_caption_coco_opt2.7b", "g", "opt-2.7b", paper_trainable=1.1e9),
    Recipe("blip2_ft_caption_coco_flant5xl", "g", "flan-t5-xl", paper_trainable=1.1e9),
    Recipe("blip2_ft_vqav2_opt2.7b", "g", "opt-2.7b", paper_trainable=1.1e9),
    Recipe("blip2_ft_vqav2_flant5xl", "g", "flan-t5-xl", paper_trainable=1.1e9),
    # BLIP / ALBEF pretraining trains the ViT and the text transformer; their momentum copies are frozen fp32.
    # BLIP ViT-B: the paper's 224M (our MED, as the authors' code, counts 252.4M: the encoder's BERT-base, its
    # cross-attention and the decoder's own self-attention). BLIP ViT-L and ALBEF: our exact count (474.7M,
    # 209.9M), not a paper figure.
    Recipe("blip_pretrain_vitb_14m", "b16", paper_trainable=224e6),
    Recipe("blip_pretrain_vitb_129m", "b16", paper_trainable=224e6),
    Recipe("blip_pretrain_vitl_14m", "l16", paper_trainable=474_704_447),
    Recipe("albef_pretrain_4m", "b16", paper_trainable=209_928_511),
    Recipe("albef_pretrain_14m", "b16", paper_trainable=209_928_511),
    Recipe("blip_pretrain_vitb_14m_bootstrapped", "b16", paper_trainable=224e6),
    # BLIP fine-tuning (model.objective): what the objective does not read is frozen. Retrieval ViT-B: 223.7M
    # trainable (the paper's 224M), its momentum copies frozen; captioning: no momentum model. Our exact counts.
    Recipe("blip_ft_retrieval_coco_vitb", "b16", paper_trainable=223_735_043),
    Recipe("blip_ft_retrieval_flickr_vitb", "b16", paper_trainable=223_735_043),
    Recipe("blip_ft_retrieval_coco_vitl", "l16", paper_trainable=446_104_067),
    Recipe("blip_ft_caption_coco_vitb", "b16", paper_trainable=223_962_428),
    Recipe("blip_ft_caption_coco_vitl", "l16", paper_trainable=446_265_916),
    # VQA: the MED as question encoder plus its untied answer decoder (361.5M, as the authors' blip_vqa counts).
    Recipe("blip_ft_vqav2_vitb", "b16", paper_trainable=361_469_756),
    # X-InstructBLIP: one modality's Q-Former (the BLIP-2 Q-Former with its instruction input, its cross-attention
    # reading the encoder's width) and projection; our exact counts (the paper gives none per modality).
    Recipe("xinstructblip_audio_vicuna7b", "g", "vicuna-7b", paper_trainable=182_939_392, encoder="ast"),
    Recipe("xinstructblip_3d_vicuna7b", "g", "vicuna-7b", paper_trainable=179_398_144, encoder="point_bert"),
]
AST_AUDIOSET = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    patch_size=16, frequency_stride=10, time_stride=10, max_length=1024, num_mel_bins=128)
"""The released AudioSet AST (ast-finetuned-audioset-10-10-0.4593): 10.24-s segments of 128 mel bins."""


def build_encoder(name: str):
    """The frozen tower of an X-InstructBLIP recipe at its real size (random; on the caller's device)."""
    if name == "ast":
        from transformers import ASTConfig, ASTModel

        from blip_train.models.audio_encoder import AudioEncoder
        return AudioEncoder(ASTModel(ASTConfig(**AST_AUDIOSET)))
    from blip_train.models.point_encoder import PointBertShape, PointEncoder
    return PointEncoder(PointBertShape(in_channels=6))  # ULIP-2's, reading xyz + rgb
BLIP_ARCHS = ("blip", "albef")
"""model.arch values built by BlipPretrain (ViT + text transformer + momentum copies + feature queue)."""


# ----------------------------------------------------------------------------------------- memory model

@dataclass
class Footprint:
    trainable: int
    frozen_bytes: int
    """Frozen parameters in the dtype training holds them in (BLIP / ALBEF's momentum copies: fp32)."""
    frozen: int = 0
    momentum: int = 0
    """Of the frozen parameters, the momentum copies (BLIP / ALBEF)."""
    buffer_bytes: int = 0
    """Buffers, whole on every rank at any ZeRO stage (BLIP / ALBEF's feature queue: 2 x embed_dim x queue_size
    fp32)."""
    zero_stage: int = 3
    """The recipe's deepspeed.zero_stage (the bench runs each recipe's own)."""

    def minimum_per_rank(self, world: int = WORLD) -> float:
        """Bytes per rank the recipe's ZeRO stage cannot avoid. ZeRO-3: parameters (frozen ones too), gradients
        and optimizer state partitioned, nothing gathered. ZeRO-2: the 16-bit weights and the frozen parameters
        whole on every rank, the rest (16-bit gradient, fp32 master and gradient, Adam's moments: 18 bytes)
        partitioned; ZeRO-1 also keeps the 16-bit gradient whole, ZeRO-0 everything."""
        whole_per_trainable = {0: BYTES_PER_TRAINABLE, 1: 4, 2: 2, 3: 0}[self.zero_stage]
        whole = self.buffer_bytes + whole_per_trainable * self.trainable
        if self.zero_stage >= 3:
            return whole + (self.frozen_bytes + BYTES_PER_TRAINABLE * self.trainable) / world
        return whole + self.frozen_bytes + (BYTES_PER_TRAINABLE - whole_per_trainable) * self.trainable / world


def analytic_minimum_gib(trainable: int, frozen_bytes: int, world: int = WORLD) -> float:
    return Footprint(trainable, frozen_bytes).minimum_per_rank(world) / GIB


def target_gib(minimum_gib: float, baseline_gib: float) -> float:
    return TARGET_RATIO * (minimum_gib + baseline_gib)


def layers_that_fit(per_layer_bytes: int, fixed_bytes: float, layers: int, budget_bytes: float) -> int:
    """Most LLM layers (at most `layers`) whose frozen bytes, on top of `fixed_bytes`, stay within the budget."""
    if fixed_bytes + per_layer_bytes * layers <= budget_bytes:
        return layers
    return max(0, int((budget_bytes - fixed_bytes) // per_layer_bytes))


# ----------------------------------------------------------------------------------------- towers

def recipe_config(recipe: str):
    from blip_train.config import load_config
    return load_config(recipe)


def model_config(recipe: str):
    return recipe_config(recipe).model


def count_footprint(recipe: Recipe, llm_layers: Optional[int] = None) -> tuple[Footprint, dict]:
    """Trainable and frozen parameters of the recipe's model, counted on the meta device (nothing allocated)."""
    import torch

    from bench.scale.towers import build_hf_llm
    from blip_train.models.blip import BlipPretrain, TextTokens
    from blip_train.models.llm_bridge import Blip2LLM
    from blip_train.models.stage1 import Blip2Stage1

    cfg = recipe_config(recipe.name)
    m = cfg.model
    m.vision.weights = m.qformer.bert_init = m.text.bert_init = m.init_from = ""
    momentum_ids: set[int] = set()
    with torch.device("meta"):
        if m.arch in BLIP_ARCHS:
            # The token ids only pick tokens in forward; the sizes come from model.text.vocab_size.
            v = m.text.vocab_size
            model = BlipPretrain(m, TextTokens(pad=0, cls=101, sep=102, mask=103, enc=v - 1, dec=v - 2, vocab_size=v))
            momentum_ids = {id(copy) for _, copy in model.momentum_pairs()}
        elif recipe.llm is None:
            model = Blip2Stage1(m, device_type="cpu")
        else:
            llm = build_hf_llm(recipe.llm, llm_layers, meta=True)
            encoder = {} if recipe.encoder is None else {
                "audio_encoder" if recipe.encoder == "ast" else "points_encoder": build_encoder(recipe.encoder)}
            model = Blip2LLM(m, llm, device_type="cpu", **encoder)
    parts: dict = {}
    trainable = frozen = frozen_bytes = momentum = 0
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if p.requires_grad:
            trainable += p.numel()
            parts.setdefault(top, [0, 0])[0] += p.numel()
        else:
            frozen += p.numel()
            parts.setdefault(top, [0, 0])[1] += p.numel()
            # The dtypes training holds the towers in: the ViT in model.vision.precision (fp16 -> bf16 on a
            # CPU), the LLM in model.llm.dtype; BLIP / ALBEF's momentum copies in fp32 (training/momentum.py).
            if id(p) in momentum_ids:
                momentum += p.numel()
                dtype = "fp32"
            else:
                dtype = m.vision.precision if top == "visual_encoder" else m.llm.dtype  # other encoders: the LLM's
            frozen_bytes += p.numel() * DTYPE_BYTES[dtype]
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return Footprint(trainable, frozen_bytes, frozen, momentum, buffer_bytes, cfg.deepspeed.zero_stage), parts



def plan(recipes: list[Recipe], baseline_gib: float, budget: float) -> list[tuple[Recipe, Footprint, str]]:
    """Each recipe at full size when its target fits the budget on 2 ranks, else at its real width with the
    LLM layers that fit (said plainly), or skipped with the arithmetic."""
    def need(fp: Footprint) -> float:  # bytes both ranks may reach at the target
        return WORLD * target_gib(fp.minimum_per_rank() / GIB, baseline_gib) * GIB

    planned = []
    for r in recipes:
        full, _ = count_footprint(r)
        if need(full) > budget and r.llm is None:
            planned.append((r, full, f"skipped: needs 2 x {need(full) / WORLD / GIB:.1f} GiB at the target, "
                                     f"{budget / GIB:.1f} GiB available"))
            continue
        if need(full) <= budget:
            planned.append((r, full, f"full size: 2 x {need(full) / WORLD / GIB:.1f} GiB at the target, "
                                     f"{budget / GIB:.1f} GiB available"))
            continue
        spec = LLMS[r.llm]
        layers = spec.get("num_hidden_layers", spec.get("num_layers"))
        one, two = count_footprint(r, 1)[0], count_footprint(r, 2)[0]
        per_layer = need(two) - need(one)  # every layer is the same size: the need is linear in layers
        fit = min(layers, int((budget - need(one)) // per_layer) + 1) if budget >= need(one) else 0
        why = (f"full size needs 2 x {need(full) / WORLD / GIB:.1f} GiB at the target, {budget / GIB:.1f} GiB "
               f"available; each of its {layers} LLM layers adds {per_layer / GIB:.2f} GiB")
        if fit < 1:
            planned.append((r, full, "skipped: " + why))
        else:
            planned.append((replace(r, llm_layers=fit), count_footprint(r, fit)[0],
                            f"real width, {fit} of {layers} LLM layers: " + why))
    return planned


