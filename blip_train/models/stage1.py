"""BLIP-2 stage 1: Q-Former representation learning against a frozen ViT (ITC + ITM + ITG).

`Blip2Stage1(batch)` returns named losses; the losses themselves are the pure functions of
`stage1_losses.py`. Other ranks are seen only through `self.world` (a `WorldInfo`, one rank by
default; the trainer sets `model.world = build_world_info()`).

ZeRO-3 note: every rank must call the same submodules in the same order on every step, otherwise
the parameter all-gathers of different ranks pair up wrongly and hang. So `forward` and
`generate_captions` have no data-dependent control flow: every step runs vision → ln_vision →
Q-Former (queries) → vision_proj → Q-Former (text) → text_proj → Q-Former (ITM) → itm_head →
Q-Former (ITG) → LM head, and generation always runs `max_len - 1` decoding steps.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from blip_train.config.schema import ModelConfig
from blip_train.models.eva_vit import EVAViT, LayerNormFP32
from blip_train.models.freezing import freeze_
from blip_train.models.qformer import QFormer
from blip_train.models.stage1_losses import itc_loss, itg_loss, itm_loss, sample_hard_negatives
from blip_train.models.world import WorldInfo

TEMP_MIN, TEMP_MAX = 0.001, 0.5
"""Range of the ITC temperature (BLIP-2 clamps it before each use)."""


def pad_text_for_gather(ids: torch.Tensor, mask: torch.Tensor, max_len: int,
                        pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad text to max_len (model.max_txt_len) so that its all_gather has the same shape on every rank. The
    padded positions are masked out, so their id matters only as a valid embedding index."""
    extra = max_len - ids.shape[1]
    if extra < 0:
        raise ValueError(f"text length {ids.shape[1]} exceeds model.max_txt_len={max_len}")
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0)


def frozen_vision_dtype(precision: str, device_type: str) -> torch.dtype:
    """Dtype of the frozen ViT: fp16 on CUDA, bf16 in its place on CPU (fp16 CPU kernels are incomplete)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or device_type != "cuda":
        return torch.bfloat16
    return torch.float16


def build_vision_tower(cfg: ModelConfig, device_type: Optional[str] = None) -> EVAViT:
    """EVAViT(cfg.vision); when cfg.vision.frozen, cast to its frozen dtype and frozen (shared by all stages).

    device_type picks the frozen dtype (see `frozen_vision_dtype`); default: cuda if available.
    """
    visual_encoder = EVAViT(cfg.vision, attention=cfg.attention)
    if cfg.vision.frozen:
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        # Under deepspeed.zero.Init the tower is partitioned at construction, in the engine's dtype,
        # and can no longer be cast (partitioned parameters carry `ds_id`).
        if not any(hasattr(p, "ds_id") for p in visual_encoder.parameters()):
            visual_encoder.to(frozen_vision_dtype(cfg.vision.precision, device_type))
        freeze_(visual_encoder)
    return visual_encoder


def expand_query_tokens(query_tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(1, Nq, D) learned queries -> (B, Nq, D), refusing a ZeRO-3 partition read outside forward."""
    if query_tokens.numel() == 0:
        # A ZeRO-3 partition outside forward: inference helpers are plain methods, so the engine's
        # forward hooks have not gathered this root-level parameter.
        raise RuntimeError("query_tokens is partitioned: call inside blip_train.distributed.zero.gathered("
                           "[model.query_tokens]) or keep it persistent (param_persistence_threshold)")
    return query_tokens.expand(batch_size, -1, -1)


class Blip2Stage1(nn.Module):
    """Frozen ViT + trainable ln_vision, Q-Former, query tokens, ITC projections and ITM head."""

    PARAMETER_BOUNDS = {"temp": (TEMP_MIN, TEMP_MAX)}
    """Ranges the trainer keeps parameters in after each optimizer step (on the fp32 master weights as
    well as the working copy; see training/engine.apply_parameter_bounds_). BLIP-2 clamps the
    temperature in place before each use; under ZeRO that would edit only the 16-bit working copy while
    the optimizer's master drifts out of range."""

    def __init__(self, cfg: ModelConfig, world: Optional[WorldInfo] = None, *,
                 device_type: Optional[str] = None, visual_encoder: Optional[EVAViT] = None) -> None:
        """device_type picks the frozen tower's dtype (see `frozen_vision_dtype`); default: cuda if available.
        visual_encoder: the tower already built (e.g. partitioned as it was built); default: built here."""
        super().__init__()
        self.world = world if world is not None else WorldInfo()
        self.max_txt_len = cfg.max_txt_len
        self.vision_frozen = cfg.vision.frozen

        self.visual_encoder = visual_encoder if visual_encoder is not None else build_vision_tower(cfg, device_type)
        self.ln_vision = LayerNormFP32(cfg.vision.width, eps=cfg.vision.layer_norm_eps)  # trainable, fp32; eps as HF post_layernorm

        qcfg = cfg.qformer
        self.qformer = QFormer(qcfg, encoder_width=cfg.vision.width, attention=cfg.attention)
        self.query_tokens = nn.Parameter(torch.randn(1, qcfg.num_query_tokens, qcfg.hidden_size) * 0.02)
        self.vision_proj = nn.Linear(qcfg.hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(qcfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views at start-up,
        # which a 0-dim tensor cannot give. (LAVIS stores a 0-dim `temp`; importers reshape it.)
        self.temp = nn.Parameter(torch.full((1,), 0.07))

    # ----------------------------------------------------------------------------------------------
    # building blocks

    def _trainable_dtype(self) -> torch.dtype:
        # The engine may cast the trainable part to bf16/fp16; image features must follow it.
        return self.query_tokens.dtype

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → ln_vision(ViT(x)) (B, 1+N, W) in the Q-Former's dtype."""
        # No activations are kept for a frozen tower: nothing upstream of it trains.
        with torch.no_grad() if self.vision_frozen else nullcontext():
            embeds = self.visual_encoder(pixel_values)  # (B, 1+N, W) in the tower's dtype
        return self.ln_vision(embeds).to(self._trainable_dtype())  # ln_vision computes (and returns) fp32

    def _queries(self, batch_size: int) -> torch.Tensor:
        return expand_query_tokens(self.query_tokens, batch_size)  # (B, Nq, D)

    def _temperature(self) -> torch.Tensor:
        # Functional: the parameter itself is kept in range by the trainer (PARAMETER_BOUNDS); this
        # covers weights loaded from elsewhere and the rounding of a 16-bit copy. Inside the range the
        # gradient passes unchanged, as with BLIP-2's in-place clamp.
        return self.temp.clamp(TEMP_MIN, TEMP_MAX)

    def _itm_logits(self, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                    text_mask: torch.Tensor) -> torch.Tensor:
        """(N, Nimg, W), (N, T) → (N, 2): mean over query positions of the ITM head."""
        n, nq = text_ids.shape[0], self.query_tokens.shape[1]
        out = self.qformer(query_embeds=self._queries(n), input_ids=text_ids, attention_mask=text_mask,
                           image_embeds=image_embeds, mask="bidirectional")
        return self.itm_head(out.last_hidden_state[:, :nq]).mean(dim=1)  # (N, Nq, 2) → (N, 2)

    # ----------------------------------------------------------------------------------------------
    # training

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage-1 losses of one micro-batch. Keys: pixel_values, text_ids, text_mask, itg_input_ids,
        itg_labels, image_ids. Returns loss (= itc + itm + itg, unweighted), loss_itc, loss_itm, loss_itg.
        """
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        image_ids = batch["image_ids"]
        bsz = text_ids.shape[0]

        # ITC: queries attend to the image; the text encoder sees text only (unimodal).
        image_embeds = self.image_embeddings(batch["pixel_values"])  # (B, Nimg, W)
        query_out = self.qformer(query_embeds=self._queries(bsz), image_embeds=image_embeds, use_cache=True)
        image_feats = F.normalize(self.vision_proj(query_out.last_hidden_state), dim=-1)  # (B, Nq, E)
        text_out = self.qformer(input_ids=text_ids, attention_mask=text_mask)
        text_feat = F.normalize(self.text_proj(text_out.last_hidden_state[:, 0]), dim=-1)  # (B, E)
        itc = itc_loss(image_feats, text_feat, self._temperature(), self.world, image_ids=image_ids)

        # ITM: one hard negative per sample and direction, from the global batch. Negative images keep
        # their gradient (to ln_vision of the rank that owns them) as in BLIP-2; token ids need none.
        # Sampling uses torch's global RNG on the sims' device, which the trainer checkpoints.
        neg_image_idx, neg_text_idx = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, self.world,
                                                            image_ids=image_ids)
        all_image_embeds = self.world.gather_with_grad(image_embeds)  # (B*W, Nimg, W)
        ids_pad, mask_pad = pad_text_for_gather(text_ids, text_mask, self.max_txt_len)  # (B, L)
        all_ids, all_mask = self.world.gather(ids_pad), self.world.gather(mask_pad)  # (B*W, L)
        itm_ids = torch.cat([ids_pad, ids_pad, all_ids[neg_text_idx]])  # (3B, L)
        itm_mask = torch.cat([mask_pad, mask_pad, all_mask[neg_text_idx]])  # (3B, L)
        itm_images = torch.cat([image_embeds, all_image_embeds[neg_image_idx], image_embeds])  # (3B, Nimg, W)
        loss_itm = itm_loss(self._itm_logits(itm_images, itm_ids, itm_mask))

        # ITG: [DEC]-prefixed text attends causally to itself and to the cached query keys/values.
        itg_out = self.qformer(input_ids=batch["itg_input_ids"], attention_mask=text_mask,
                               past_key_values=query_out.past_key_values, mask="causal")
        text_len = text_ids.shape[1]
        lm_logits = self.qformer.lm_logits(itg_out.last_hidden_state[:, -text_len:])  # (B, T, V)
        loss_itg = itg_loss(lm_logits, batch["itg_labels"])

        loss = itc.loss + loss_itm + loss_itg
        return {"loss": loss, "loss_itc": itc.loss, "loss_itm": loss_itm, "loss_itg": loss_itg}

    # ----------------------------------------------------------------------------------------------
    # inference (retrieval evaluation, CapFilt); run under model.eval(). Under ZeRO-3 these are
    # collective like forward (all ranks call them together); submodules gather their own weights,
    # `query_tokens` must be persistent or gathered by the caller (see `_queries`).

    @property
    def image_feat_tokens(self) -> int:
        """ITC features per image (one per query; retrieval takes the best-matching one)."""
        return self.query_tokens.shape[1]

    def eval_root_parameters(self) -> list[nn.Parameter]:
        """Parameters read outside a submodule's forward during evaluation: ZeRO-3 callers gather them."""
        return [self.query_tokens, self.temp]

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) → (image_embeds (B, Nimg, W) after ln_vision, image_feats (B, Nq, E) normalised)."""
        image_embeds = self.image_embeddings(pixel_values)
        out = self.qformer(query_embeds=self._queries(pixel_values.shape[0]), image_embeds=image_embeds)
        return image_embeds, F.normalize(self.vision_proj(out.last_hidden_state), dim=-1)

    @torch.no_grad()
    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) [CLS]-first text → text_feat (B, E) normalised."""
        out = self.qformer(input_ids=text_ids, attention_mask=text_mask)
        return F.normalize(self.text_proj(out.last_hidden_state[:, 0]), dim=-1)

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                   text_mask: torch.Tensor, probability: bool = False) -> torch.Tensor:
        """Matching score of each (image, text) pair: the positive-class logit (B,), as BLIP-2 ranks by.

        image_embeds come from `encode_image`. probability=True gives softmax over the two logits
        instead, P(match) in [0, 1]: a calibrated scale a filter threshold can be set on (CapFilt).
        """
        logits = self._itm_logits(image_embeds, text_ids, text_mask)  # (B, 2)
        return logits.float().softmax(-1)[:, 1] if probability else logits[:, 1]

    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor, bos_id: int, sep_id: int, pad_id: int,
                          max_len: int = 30, num_beams: int = 1, top_p: Optional[float] = None,
                          num_captions: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Captions through the ITG path: greedy (top_p None) or nucleus sampling (top_p in (0, 1]).

        Returns (B * num_captions, max_len) token ids, captions of image 0 first; column 0 is `bos_id`
        ([DEC]), a caption ends with `sep_id` and is followed by `pad_id`. Beam search is not
        implemented (num_beams must be 1). Each step re-encodes the whole text prefix against the
        cached query keys/values (the training ITG call); the cost is quadratic in max_len, which is
        small for captions. No early exit: every rank runs the same steps (ZeRO-3). `generator` (on the
        model's device) drives the sampling instead of torch's global RNG, so that a caller can make the
        samples a function of the data alone (CapFilt: same output at any world size).
        """
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: only greedy/nucleus decoding (num_beams=1) is implemented")
        image_embeds = self.image_embeddings(pixel_values).repeat_interleave(num_captions, dim=0)  # (N, Nimg, W)
        n = image_embeds.shape[0]
        query_out = self.qformer(query_embeds=self._queries(n), image_embeds=image_embeds, use_cache=True)
        ids = torch.full((n, 1), bos_id, dtype=torch.long, device=image_embeds.device)  # (N, 1)
        done = torch.zeros(n, dtype=torch.bool, device=ids.device)
        for _ in range(max_len - 1):
            out = self.qformer(input_ids=ids, attention_mask=torch.ones_like(ids),
                               past_key_values=query_out.past_key_values, mask="causal")
            logits = self.qformer.lm_logits(out.last_hidden_state[:, -1:])[:, 0].float()  # (N, V)
            nxt = logits.argmax(-1) if top_p is None else nucleus_sample(logits, top_p, generator)  # (N,)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            done = done | (nxt == sep_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return ids


def nucleus_sample(logits: torch.Tensor, top_p: float,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row from the smallest set of top tokens whose probability reaches top_p."""
    probs = logits.softmax(-1)  # (N, V)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep a token if the mass strictly before it is < top_p (the top token is always kept)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    sorted_probs = sorted_probs * keep
    pick = torch.multinomial(sorted_probs, 1, generator=generator)  # (N, 1) position in the sorted order
    return order.gather(-1, pick)[:, 0]
