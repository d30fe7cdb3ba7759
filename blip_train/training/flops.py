"""Model FLOPs of one training micro-batch, for throughput and effective MFU reporting.

Counting convention (as nanoGPT / PaLM's MFU): only matrix multiplies count, 2 FLOPs per
multiply-add. A frozen module run forward only costs its forward (2N per token, N = matmul
parameters it applies); a trained module costs forward + backward = 3x forward (6N per token: the
backward computes input and weight gradients). A frozen module that gradients flow *through* (the
LLM of stage 2 / InstructBLIP) costs forward + input gradient = 2x forward (4N per token).
Attention is counted explicitly: Q K^T and P V are 2 * Tq * Tk * D FLOPs each per layer and sample,
over the full (padded, masked) rectangle, since the kernels compute it all; its backward is 2x its
forward wherever a gradient passes (it has no weights, so the frozen LLM's attention costs 3x too).

Tokens (for tokens/s) are the positions a sample feeds the model: image patch tokens (+ CLS) plus
the non-padding text tokens. Everything here is arithmetic on shapes and configs: no device sync.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from blip_train.config.schema import ModelConfig, QFormerConfig, VisionConfig

TRAINED, FROZEN_FORWARD, FROZEN_BACKPROP = 3.0, 1.0, 2.0
"""Multipliers of the forward FLOPs: trained module, frozen forward-only, frozen with input gradient."""

PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("V100", 125.0))
"""Dense fp16/bf16 tensor-core peak per GPU, matched against the device name in this order."""


def _attention(tq: int, tk: int, width: int) -> float:
    """Forward FLOPs of softmax(Q K^T) V for one sample and layer: two (Tq x Tk x D) matmuls."""
    return 4.0 * tq * tk * width


def vision_tokens(v: VisionConfig) -> int:
    """Tokens of one image in the ViT: CLS + (S/P)^2 patches."""
    return 1 + (v.image_size // v.patch_size) ** 2


def vit_forward_flops(v: VisionConfig, batch: int) -> float:
    """Forward FLOPs of the EVA ViT on `batch` images (patch conv + blocks, no final norm)."""
    n = vision_tokens(v)
    blocks = v.layers - 1 if v.drop_last_block else v.layers
    patch = 2.0 * (n - 1) * 3 * v.patch_size ** 2 * v.width
    per_block = 2.0 * n * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim) + _attention(n, n, v.width)
    return batch * (patch + blocks * per_block)


@dataclass(frozen=True)
class TowerShape:
    """What the count needs of the tower the Q-Former reads, per encoder input (an image, a video frame, an
    audio segment, a point cloud)."""
    tokens: int
    width: int
    forward: float
    """Forward FLOPs of one input."""
    multiplier: float
    """FROZEN_FORWARD, or TRAINED for a training ViT."""


def vision_tower(v: VisionConfig) -> TowerShape:
    return TowerShape(vision_tokens(v), v.width, vit_forward_flops(v, 1), FROZEN_FORWARD if v.frozen else TRAINED)


def audio_tower(c) -> TowerShape:
    """An ASTModel's config `c`: 16 x 16 patches of the (max_length x num_mel_bins) filterbank at the config's
    strides, plus its two summary tokens; blocks as a ViT's; always frozen."""
    patches = ((c.num_mel_bins - c.patch_size) // c.frequency_stride + 1) * (
        (c.max_length - c.patch_size) // c.time_stride + 1)
    n, w = patches + 2, c.hidden_size
    per_block = 2.0 * n * (4 * w * w + 2 * w * c.intermediate_size) + _attention(n, n, w)
    return TowerShape(n, w, 2.0 * patches * c.patch_size ** 2 * w + c.num_hidden_layers * per_block, FROZEN_FORWARD)


def points_tower(s) -> TowerShape:
    """A Point-BERT's PointBertShape `s`: its patch PointNet over every point of every patch, reduce_dim and the
    centres' position MLP per patch, then blocks as a ViT's over [cls; patches]; always frozen."""
    g, k, w = s.num_group, s.group_size, s.trans_dim
    n, hidden = g + 1, int(w * s.mlp_ratio)
    pointnet = 2.0 * g * k * (s.in_channels * 128 + 128 * 256 + 512 * 512 + 512 * s.encoder_dims)
    per_block = 2.0 * n * (4 * w * w + 2 * w * hidden) + _attention(n, n, w)
    embed = 2.0 * g * (s.encoder_dims * w + 3 * 128 + 128 * w)
    return TowerShape(n, w, pointnet + embed + s.depth * per_block, FROZEN_FORWARD)


def qformer_forward_flops(q: QFormerConfig, encoder_width: int, batch: int, n_query: int, n_text: int,
                          n_image: int = 0, n_cached: int = 0) -> float:
    """Forward FLOPs of one Q-Former call on `batch` sequences of [n_query queries; n_text text].

    n_image: image tokens the queries cross-attend to (layers 0, f, 2f, ...); n_cached: cached query
    keys/values the rows also attend to (the ITG call), whose projections are not recomputed.
    """
    d, t = q.hidden_size, n_query + n_text
    flops = 0.0
    for layer in range(q.layers):
        flops += 2.0 * t * 4 * d * d + _attention(t, n_cached + t, d)  # self-attention q, k, v, out
        if n_query and layer % q.cross_attention_freq == 0:
            flops += 2.0 * (n_query * 2 * d * d + n_image * 2 * encoder_width * d)  # cross q, out; k, v
            flops += _attention(n_query, n_image, d)
        flops += 2.0 * t * 2 * d * q.intermediate_size  # query FFN or text FFN, one per position
    return batch * flops


def stage1_flops(cfg: ModelConfig, batch: int, text_len: int, itm_text_len: Optional[int] = None,
                 itg: bool = True) -> dict[str, float]:
    """FLOPs of one Blip2Stage1 forward + backward, by part (see the module docstring).

    text_len: the batch's (padded) text length; itm_text_len: the ITM text length (max_txt_len:
    the model pads text to it for the cross-rank gather). itg=False leaves out the ITG pass and LM head.
    """
    q, v = cfg.qformer, cfg.vision
    itm_text_len = cfg.max_txt_len if itm_text_len is None else itm_text_len
    nq, nimg, d = q.num_query_tokens, vision_tokens(v), q.hidden_size
    parts = {"vision": vit_forward_flops(v, batch) * (FROZEN_FORWARD if v.frozen else TRAINED)}
    qf = qformer_forward_flops(q, v.width, batch, nq, 0, nimg)  # ITC: queries over the image
    qf += qformer_forward_flops(q, v.width, batch, 0, text_len)  # ITC: text alone
    qf += qformer_forward_flops(q, v.width, 3 * batch, nq, itm_text_len, nimg)  # ITM: pos, neg image, neg text
    heads = 2.0 * batch * (nq * d * cfg.embed_dim + d * cfg.embed_dim + 3 * nq * d * 2)  # projections, ITM head
    if itg:
        qf += qformer_forward_flops(q, v.width, batch, 0, text_len, n_cached=nq)
        heads += 2.0 * batch * text_len * (d * d + d * q.vocab_size)  # LM head: dense + tied decoder
    parts["qformer"] = qf * TRAINED
    parts["heads"] = heads * TRAINED
    return parts


def text_forward_flops(tc, encoder_width: int, batch: int, n_text: int, layers: range, n_image: int = 0) -> float:
    """Forward FLOPs of BERT layers `layers` of a MED / ALBEF text transformer (model.text) on `batch` texts;
    with n_image, the layers from tc.fusion_layer on cross-attend from every text position to the image."""
    d, t = tc.hidden_size, n_text
    flops = 0.0
    for layer in layers:
        flops += 2.0 * t * (4 * d * d + 2 * d * tc.intermediate_size) + _attention(t, t, d)
        if n_image and layer >= tc.fusion_layer:
            flops += 2.0 * (t * 2 * d * d + n_image * 2 * encoder_width * d) + _attention(t, n_image, d)
    return batch * flops


def blip_flops(cfg: ModelConfig, batch: int, text_len: int, answers: int = 0, answer_len: int = 0) -> dict[str, float]:
    """FLOPs of one BlipPretrain forward + backward (model.arch blip | albef), by part: the trained ViT and text
    transformer, and the momentum copies run forward only. By model.objective: pretraining runs ITC + ITM + LM /
    MLM, retrieval ITC + ITM, captioning the decoder alone; VQA the image-grounded encoder on the question
    (text_len tokens) and the answer decoder on `answers` rows of answer_len tokens, cross-attending to it."""
    v, tc = cfg.vision, cfg.text
    nimg, d, itm_len = vision_tokens(v), tc.hidden_size, cfg.max_txt_len
    text_layers = range(tc.fusion_layer or tc.layers)
    every = range(tc.layers)
    vision = {"vision": vit_forward_flops(v, batch) * TRAINED}
    head = 2.0 * batch * text_len * (d * d + d * tc.vocab_size)  # LM / MLM head: dense + tied decoder
    decoder = text_forward_flops(tc, v.width, batch, text_len, every, nimg) + head  # LM decoder / MLM
    if cfg.objective == "caption":
        return {**vision, "text": decoder * TRAINED}
    if cfg.objective == "vqa":
        question = text_forward_flops(tc, v.width, batch, text_len, every, nimg)
        answer = (text_forward_flops(replace(tc, fusion_layer=0), d, answers, answer_len, every, text_len)
                  + 2.0 * answers * answer_len * (d * d + d * tc.vocab_size))
        return {**vision, "text": (question + answer) * TRAINED}
    trained = text_forward_flops(tc, v.width, batch, text_len, text_layers)  # ITC: unimodal text
    trained += text_forward_flops(tc, v.width, 3 * batch, itm_len, every, nimg)  # ITM: pos, neg image, neg text
    if cfg.objective == "pretrain":
        trained += decoder
    momentum = vit_forward_flops(v, batch) + text_forward_flops(tc, v.width, batch, text_len, text_layers)
    if cfg.arch == "albef" and cfg.objective == "pretrain":  # the momentum model's MLM predictions (distillation)
        momentum += text_forward_flops(tc, v.width, batch, text_len, every, nimg) + head
    return {**vision, "text": trained * TRAINED, "momentum": momentum * FROZEN_FORWARD}


@dataclass
class LLMShape:
    """What the FLOP count needs to know about a frozen HF LLM (read once from the module)."""
    encoder_decoder: bool
    encoder_matmul_params: int
    """Linear weights applied to each encoder token (decoder-only: to each token, LM head included)."""
    decoder_matmul_params: int
    """Encoder-decoder: Linear weights applied to each decoder token (LM head included)."""
    cross_kv_params: int
    """Encoder-decoder: the decoder's cross-attention key/value weights (they run on encoder tokens)."""
    width: int
    encoder_layers: int
    decoder_layers: int


_CROSS_KV = re.compile(r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj)$")
"""Decoder Linears that project the encoder output (T5, BART naming)."""


def llm_shape(llm: nn.Module) -> LLMShape:
    """Count the Linear weights of `llm` by the tokens they run on: encoder, decoder, or (decoder-only)
    every token. ZeRO-3 partitions hold 0 local elements; their full size is `ds_numel`."""
    enc = dec = cross = 0
    for name, module in llm.named_modules():
        if isinstance(module, nn.Linear):
            n = getattr(module.weight, "ds_numel", module.weight.numel())
            if ".encoder." in f".{name}.":
                enc += n
            elif _CROSS_KV.search(name):
                cross += n
            else:
                dec += n
    c = llm.config.get_text_config()
    width = getattr(c, "hidden_size", None) or c.d_model
    layers = getattr(c, "num_hidden_layers", None) or c.num_layers
    if not llm.config.is_encoder_decoder:
        return LLMShape(False, enc + dec + cross, 0, 0, width, layers, 0)
    return LLMShape(True, enc, dec, cross, width, layers, getattr(c, "num_decoder_layers", None) or layers)


def llm_stage_flops(cfg: ModelConfig, llm: LLMShape, batch: int, llm_len: int, decoder_len: int = 0,
                    instruction_len: int = 0, frames: int = 1, tower: Optional[TowerShape] = None) -> dict[str, float]:
    """FLOPs of one Blip2LLM forward + backward, by part.

    llm_len: tokens the LLM reads besides the soft prompt (decoder-only: the text and the modality prefix;
    encoder-decoder: the encoder's); decoder_len: decoder targets (encoder-decoder); instruction_len: Q-Former
    text (InstructBLIP); frames: video frames (audio segments) per sample, each through the encoder and the
    Q-Former (the LLM reads frames x queries); tower: the encoder (default: the ViT of cfg.vision).
    """
    q = cfg.qformer
    tower = tower or vision_tower(cfg.vision)
    nq, images = q.num_query_tokens, batch * frames
    parts = {"vision": images * tower.forward * tower.multiplier}
    qf = qformer_forward_flops(q, tower.width, images, nq, instruction_len, tower.tokens)
    parts["qformer"] = TRAINED * (qf + 2.0 * images * nq * q.hidden_size * llm.width)  # + llm_proj
    enc_t = nq * frames + llm_len  # soft prompt + text
    matmul = 2.0 * enc_t * llm.encoder_matmul_params
    attn = llm.encoder_layers * _attention(enc_t, enc_t, llm.width)
    if llm.encoder_decoder:
        matmul += 2.0 * (decoder_len * llm.decoder_matmul_params + enc_t * llm.cross_kv_params)
        attn += llm.decoder_layers * (_attention(decoder_len, decoder_len, llm.width)
                                      + _attention(decoder_len, enc_t, llm.width))
    # Frozen, but the gradient flows back to the soft prompt: matmuls 2x (no weight gradient),
    # attention 3x (its backward needs dQ, dK, dV and dP whatever is trained).
    parts["llm"] = batch * (matmul * FROZEN_BACKPROP + attn * TRAINED)
    return parts


def batch_tokens(batch: Mapping[str, torch.Tensor], n_image_tokens: int, decoder_targets: bool = False,
                 sample_dims: int = 3) -> int:
    """Input tokens of a micro-batch: image (audio) tokens + non-padding text (stage-1 or LLM keys).

    decoder_targets: also count the decoder's target tokens (encoder-decoder LLMs). sample_dims: dimensions of
    one encoder input (3 for an image, 2 for an audio segment); one more is a clip of several.
    """
    text = sum(int(batch[k].sum()) for k in ("text_mask", "llm_attention_mask", "qformer_attention_mask",
                                             "question_mask", "answer_mask") if k in batch)
    if decoder_targets:
        text += int((batch["llm_labels"] != -100).sum())
    pixels = batch["pixel_values"]
    images = pixels.shape[:2].numel() if pixels.dim() == sample_dims + 2 else pixels.shape[0]  # clips: every piece
    return images * n_image_tokens + text


WorkCounter = Callable[[Mapping[str, torch.Tensor]], tuple[int, float]]
"""micro-batch -> (input tokens, model FLOPs of its forward + backward)."""


def build_flops_counter(cfg: ModelConfig, model: nn.Module) -> WorkCounter:
    """A function micro-batch -> (tokens, model FLOPs) for this model; call it on the host-side batch
    (before it moves to the device) so that counting tokens never waits for the device."""
    n_img = vision_tokens(cfg.vision)
    if cfg.arch == "stage1":
        def count(batch: Mapping[str, torch.Tensor]) -> tuple[int, float]:
            b, t = batch["text_ids"].shape
            return batch_tokens(batch, n_img), sum(stage1_flops(cfg, b, t).values())
        return count
    if cfg.arch in ("blip", "albef"):
        def count_blip(batch: Mapping[str, torch.Tensor]) -> tuple[int, float]:
            if "question_ids" in batch:  # VQA
                (b, t), (n, ta) = batch["question_ids"].shape, batch["answer_ids"].shape
                return batch_tokens(batch, n_img), sum(blip_flops(cfg, b, t, n, ta).values())
            b, t = batch["text_ids"].shape
            return batch_tokens(batch, n_img), sum(blip_flops(cfg, b, t).values())
        return count_blip
    shape = llm_shape(model.llm)
    tower = (points_tower(model.points_encoder.shape) if model.points else
             audio_tower(model.audio_encoder.ast.config) if model.audio else vision_tower(cfg.vision))
    prefix = model.prefix_ids.numel()

    def count_llm(batch: Mapping[str, torch.Tensor]) -> tuple[int, float]:
        b, t = batch["llm_input_ids"].shape
        dec = batch["llm_labels"].shape[1] if shape.encoder_decoder else 0
        inst = batch["qformer_input_ids"].shape[1] if "qformer_input_ids" in batch else 0
        pixels = batch["pixel_values"]
        frames = pixels.shape[1] if pixels.dim() == model.sample_dims + 2 else 1
        flops = sum(llm_stage_flops(cfg, shape, b, t + prefix, dec, inst, frames, tower).values())
        return batch_tokens(batch, tower.tokens, shape.encoder_decoder, model.sample_dims), flops
    return count_llm


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16/fp16 peak FLOP/s of one device, or None when unknown (CPUs, unlisted GPUs)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None
