"""BLIP and ALBEF pretraining: a trained ViT and a BERT text transformer, with momentum encoders.

- BLIP (Li et al. 2022, model.arch=blip): ViT-B/L + MED. Losses ITC + ITM + LM, unweighted:
  ITC between the ViT's [CLS] and the unimodal text encoder's [CLS], against a momentum encoder and a
  queue of its features, with momentum distillation; ITM on the image-grounded encoder ([ENC] first)
  with one hard negative per sample and direction from the global batch; LM on the image-grounded
  decoder ([DEC] first), label smoothing 0.1.
- ALBEF (Li et al. 2021, model.arch=albef): ViT-B + 6 text and 6 fusion layers. ITC as BLIP's, ITM on
  the fusion layers ([CLS] first), and MLM on the fusion output with momentum distillation in place of LM.

Fine-tuning (model.objective), on the same model so that checkpoints, export and evaluation stay one:
- retrieval (BLIP's and ALBEF's COCO / Flickr30K fine-tuning): ITC + ITM as above, with every caption of the
  same image a positive (ITC targets spread over the same-id columns of the batch and the queue, which then
  also holds image ids; ITM never draws them as negatives). No LM / MLM.
- caption (BLIP's COCO captioner): the decoder's LM loss alone, after model.text.prompt ("a picture of "),
  which is read but never a target. No momentum model is built.
- vqa (BLIP's VQAv2 model, the authors' blip_vqa): the image-grounded encoder (`text`, [ENC] first) reads the
  question; a second MED, `text_decoder`, untied from the first (both start from the pretrained MED), decodes
  every human answer ([DEC] answer [SEP]) cross-attending to the question's states. Loss: each answer's summed
  token CE (label smoothing 0.1) times its weight (its share of the annotators), summed over the batch's answers,
  divided by the number of questions. No momentum model. Answers are generated (beam search) or ranked over a
  candidate list (`rank_answers`).
Parameters the objective never reads are frozen (`unused_by_objective`).

The momentum encoders (`*_m`) are frozen fp32 copies that the trainer moves towards the online weights
after every optimizer step (`momentum_pairs`; training/momentum.py does it on ZeRO partitions). They run
in the model's mode (dropout on in training, as the authors' code). The feature queue enqueues the
momentum features of the global batch in every training forward, identically on every rank.

ZeRO-3 note: every forward calls the same submodules in the same order on every rank (no data-dependent
branch), see models/stage1.py.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from blip_train.config.schema import OBJECTIVES, ModelConfig
from blip_train.models.blip_losses import (FeatureQueue, alpha_at, copy_params_, global_sims, lm_loss, mask_tokens,
                                           mlm_loss, momentum_itc_loss, weighted_answer_loss)
from blip_train.models.eva_vit import EVAViT
from blip_train.models.med import MED
from blip_train.models.med_decoding import decode, generate_after, rank_candidates
from blip_train.models.stage1 import TEMP_MAX, TEMP_MIN, pad_text_for_gather
from blip_train.models.stage1_losses import itm_loss, sample_hard_negatives
from blip_train.models.world import WorldInfo

ARCHS = ("blip", "albef")


@dataclasses.dataclass(frozen=True)
class TextTokens:
    """Token ids the model needs (the tokenizer lives in data/; the builder reads them from it)."""
    pad: int
    cls: int
    sep: int
    mask: int
    """[MASK] (ALBEF's MLM)."""
    enc: int
    """[ENC] (BLIP's image-grounded encoder reads it in place of [CLS]); unused by ALBEF."""
    dec: int
    """[DEC] (BLIP's decoder starts from it); unused by ALBEF."""
    vocab_size: int
    """Ids a random MLM replacement is drawn from (the tokenizer's size)."""


class BlipPretrain(nn.Module):
    """ViT + text transformer + ITC projections + ITM head + temperature, and their momentum copies."""

    PARAMETER_BOUNDS = {"temp": (TEMP_MIN, TEMP_MAX)}
    """Kept in range by the trainer after each step, on the fp32 master too (see models/stage1.py)."""

    MOMENTUM = {"visual_encoder.": "visual_encoder_m.", "text.": "text_m.", "vision_proj.": "vision_proj_m.",
                "text_proj.": "text_proj_m."}
    """Online module prefix → its momentum copy's prefix."""

    def __init__(self, cfg: ModelConfig, tokens: TextTokens, world: Optional[WorldInfo] = None) -> None:
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"model.arch={cfg.arch!r}: BlipPretrain builds {' | '.join(ARCHS)}")
        self.arch = cfg.arch
        self.objective = cfg.objective
        if cfg.objective not in OBJECTIVES[cfg.arch]:
            raise ValueError(f"model.objective={cfg.objective!r} does not apply to model.arch={cfg.arch}")
        self.world = world if world is not None else WorldInfo()
        self.tokens = tokens
        self.max_txt_len = cfg.max_txt_len
        self.mom = cfg.momentum
        self.train_step = 0
        """Optimizer steps done; the trainer sets it before each step (the distillation weight ramps with it)."""
        text_cfg = cfg.text
        if cfg.arch == "blip" and not text_cfg.decoder:
            raise ValueError("model.text.decoder: BLIP's MED needs its decoder (LM loss); set it true")

        self.visual_encoder = EVAViT(cfg.vision, attention=cfg.attention)
        self.text = MED(text_cfg, encoder_width=cfg.vision.width, attention=cfg.attention)
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(text_cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(text_cfg.hidden_size, 2)
        # Shape (1,): DeepSpeed broadcasts parameters as byte views, which a 0-dim tensor cannot give.
        self.temp = nn.Parameter(torch.full((1,), 0.07))

        # VQA: the answer decoder, a second MED cross-attending to the question encoder's states (hidden_size wide).
        self.text_decoder: Optional[MED] = None
        if self.objective == "vqa":
            self.text_decoder = MED(text_cfg, encoder_width=text_cfg.hidden_size, attention=cfg.attention)

        self.prompt_ids: list[int] = []
        """Tokens of model.text.prompt (no special tokens), read before every caption; the builder sets them."""

        # Momentum copies (not for captioning, which has no contrastive loss). BLIP's momentum text encoder only
        # ever runs unimodally: built without cross-attention and decoder; ALBEF's also runs the fusion layers and
        # the MLM head (distillation of the MLM targets).
        self.queue: Optional[FeatureQueue] = None
        if self.objective in ("pretrain", "retrieval"):
            self.visual_encoder_m = EVAViT(dataclasses.replace(cfg.vision, drop_path_rate=0.0),
                                           attention=cfg.attention)
            self.text_m = MED(dataclasses.replace(text_cfg, decoder=False), encoder_width=cfg.vision.width,
                              attention=cfg.attention, text_only=cfg.arch == "blip")
            self.vision_proj_m = nn.Linear(cfg.vision.width, cfg.embed_dim)
            self.text_proj_m = nn.Linear(text_cfg.hidden_size, cfg.embed_dim)
            self.copy_to_momentum_()
            for _, m in self.momentum_pairs():
                m.requires_grad_(False)
            # Retrieval fine-tuning also queues the image ids: every caption of an image is a positive.
            self.queue = FeatureQueue(cfg.embed_dim, cfg.momentum.queue_size, with_idx=self.objective == "retrieval")
        for name, p in self.named_parameters():
            if self.unused_by_objective(name):
                p.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------
    # momentum copies (plain tensors here; the trainer updates ZeRO partitions, training/momentum.py)

    def momentum_pairs(self) -> Iterator[tuple[nn.Parameter, nn.Parameter]]:
        """(online parameter, its momentum copy) for every momentum parameter, in a fixed order."""
        params = dict(self.named_parameters(remove_duplicate=False))
        # Each momentum tensor once: a tied alias (the MLM head's decoder is the word embedding) must not be
        # moved twice per step.
        for name, m in self.named_parameters():
            for online_prefix, mom_prefix in self.MOMENTUM.items():
                if name.startswith(mom_prefix):
                    yield params[online_prefix + name[len(mom_prefix):]], m

    def unused_by_objective(self, name: str) -> bool:
        """Whether the objective never reads the online parameter `name` (frozen at build, so the optimizer's weight
        decay cannot erode what another objective needs): captioning reads neither the encoder's self-attention nor
        the ITC / ITM heads; retrieval reads neither the decoder's self-attention nor the LM / MLM head (its
        decoder weight is the word embedding, which the encoders read, so it trains); VQA reads the first MED as the
        image-grounded encoder only and the answer decoder's causal self-attention, not its encoder self-attention."""
        if self.objective == "vqa":
            if name.startswith("text_decoder."):
                return ".self_attn." in name
            lm_head_own = name.startswith("text.lm_head.") and name != "text.lm_head.decoder.weight"
            return (".self_attn_dec." in name or lm_head_own or name == "temp"
                    or name.startswith(("vision_proj.", "text_proj.", "itm_head.")))
        if self.objective == "caption":
            return (".self_attn." in name or name.startswith(("vision_proj.", "text_proj.", "itm_head."))
                    or name == "temp")
        if self.objective == "retrieval":
            lm_head_own = name.startswith("text.lm_head.") and name != "text.lm_head.decoder.weight"
            return ".self_attn_dec." in name or lm_head_own
        return False

    def copy_to_momentum_(self) -> None:
        """Momentum copies := online weights (at build, and after loading pretrained weights)."""
        copy_params_(self.momentum_pairs())

    # ----------------------------------------------------------------------------------------------
    # building blocks

    def _temperature(self) -> torch.Tensor:
        return self.temp.clamp(TEMP_MIN, TEMP_MAX)

    def _text_feat(self, text: MED, proj: nn.Linear, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = text(ids, mask, mode="text")  # (B, T, D)
        return F.normalize(proj(hidden[:, 0]), dim=-1)  # (B, E)

    def _itm_logits(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, 1+P, Dv), (N, T) → (N, 2) from the first text position of the image-grounded encoder."""
        hidden = self.text(ids, mask, image_embeds=image_embeds, mode="multimodal")  # (N, T, D)
        return self.itm_head(hidden[:, 0])

    # ----------------------------------------------------------------------------------------------
    # training

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch. Keys: pixel_values, text_ids ([CLS] first), text_mask, image_ids, and for
        BLIP itm_input_ids ([ENC] first), itg_input_ids ([DEC] first), itg_labels. Returns loss (unweighted
        sum), loss_itc, loss_itm and, in pretraining, loss_lm (BLIP) or loss_mlm (ALBEF); captioning returns
        loss_lm alone."""
        if self.objective == "caption":
            return self._caption_losses(batch)
        if self.objective == "vqa":
            return self._vqa_losses(batch)
        text_ids, text_mask, image_ids = batch["text_ids"], batch["text_mask"], batch["image_ids"]
        alpha = alpha_at(self.train_step, self.mom.alpha, self.mom.alpha_ramp_steps)
        temp = self._temperature()
        # Retrieval fine-tuning: captions of the same image are ITC positives, here and in the queue.
        itc_idx = image_ids if self.objective == "retrieval" else None

        image_embeds = self.visual_encoder(batch["pixel_values"])  # (B, 1+P, Dv)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # (B, E)
        text_feat = self._text_feat(self.text, self.text_proj, text_ids, text_mask)  # (B, E)
        with torch.no_grad():
            image_embeds_m = self.visual_encoder_m(batch["pixel_values"])  # (B, 1+P, Dv) fp32
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)  # (B, E) fp32
            text_feat_m = self._text_feat(self.text_m, self.text_proj_m, text_ids, text_mask)  # (B, E) fp32
        itc = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.queue, temp, alpha, itc_idx)
        if self.training:  # the global batch's momentum features replace the oldest queue entries
            self.queue.enqueue_(self.world.gather(image_feat_m), self.world.gather(text_feat_m),
                                None if itc_idx is None else self.world.gather(itc_idx))

        # ITM: one hard negative per sample and direction over the global batch (online similarities). The
        # negative images keep their gradient (to the ViT of the rank that owns them); token ids need none.
        sim_i2t, sim_t2i = global_sims(image_feat, text_feat, temp, self.world)  # (B, B*W)
        neg_image_idx, neg_text_idx = sample_hard_negatives(sim_i2t, sim_t2i, self.world, image_ids=image_ids)
        itm_ids = batch["itm_input_ids"] if self.arch == "blip" else text_ids  # [ENC] | [CLS] first
        ids_pad, mask_pad = pad_text_for_gather(itm_ids, text_mask, self.max_txt_len, self.tokens.pad)  # (B, L)
        all_ids, all_mask = self.world.gather(ids_pad), self.world.gather(mask_pad)  # (B*W, L)
        all_image_embeds = self.world.gather_with_grad(image_embeds)  # (B*W, 1+P, Dv)
        pair_ids = torch.cat([ids_pad, ids_pad, all_ids[neg_text_idx]])  # (3B, L)
        pair_mask = torch.cat([mask_pad, mask_pad, all_mask[neg_text_idx]])  # (3B, L)
        pair_images = torch.cat([image_embeds, all_image_embeds[neg_image_idx], image_embeds])  # (3B, 1+P, Dv)
        loss_itm = itm_loss(self._itm_logits(pair_images, pair_ids, pair_mask))

        losses = {"loss_itc": itc.loss, "loss_itm": loss_itm}
        if self.objective == "pretrain" and self.arch == "blip":
            # LM: the [DEC]-first caption through the causal decoder, grounded on the image.
            hidden = self.text(batch["itg_input_ids"], text_mask, image_embeds=image_embeds, mode="decoder")
            losses["loss_lm"] = lm_loss(self.text.lm_logits(hidden), batch["itg_labels"])
        elif self.objective == "pretrain":
            # MLM with BERT's masking (torch's global RNG, which the trainer checkpoints per rank); the momentum
            # model's predictions at the same positions are the distillation targets.
            t = self.tokens
            masked, labels = mask_tokens(text_ids, t.vocab_size, t.mask, (t.pad, t.cls, t.sep))
            hidden = self.text(masked, text_mask, image_embeds=image_embeds, mode="multimodal")
            with torch.no_grad():
                hidden_m = self.text_m(masked, text_mask, image_embeds=image_embeds_m, mode="multimodal")
                logits_m = self.text_m.lm_logits(hidden_m)  # (B, T, V)
            losses["loss_mlm"] = mlm_loss(self.text.lm_logits(hidden), labels, logits_m, alpha)
        return {"loss": sum(losses.values()), **losses}

    def _caption_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BLIP's captioning fine-tuning: the LM loss of the image-grounded decoder alone. itg_input_ids hold
        [DEC] prompt caption [SEP]; the collator set the prompt's labels to -100 (read, never a target)."""
        image_embeds = self.visual_encoder(batch["pixel_values"])  # (B, 1+P, Dv)
        hidden = self.text(batch["itg_input_ids"], batch["text_mask"], image_embeds=image_embeds, mode="decoder")
        loss_lm = lm_loss(self.text.lm_logits(hidden), batch["itg_labels"])
        return {"loss": loss_lm, "loss_lm": loss_lm}

    def _vqa_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BLIP's VQA fine-tuning. Keys: pixel_values, question_ids ([ENC] first), question_mask (B, Tq); one row per
        (question, distinct answer): answer_ids ([DEC] answer [SEP]), answer_mask, answer_labels (N, Ta),
        answer_owner (N,) the question's row, answer_weight (N,)."""
        image_embeds = self.visual_encoder(batch["pixel_values"])  # (B, 1+P, Dv)
        states, mask = self._question_states(image_embeds, batch["question_ids"], batch["question_mask"])
        owner = batch["answer_owner"]
        hidden = self.text_decoder(batch["answer_ids"], batch["answer_mask"], image_embeds=states[owner],
                                   image_mask=mask[owner], mode="decoder")  # (N, Ta, D)
        loss = weighted_answer_loss(self.text_decoder.lm_logits(hidden), batch["answer_labels"],
                                    batch["answer_weight"], num_questions=states.shape[0])
        return {"loss": loss, "loss_vqa": loss}

    def _question_states(self, image_embeds: torch.Tensor, question_ids: torch.Tensor,
                         question_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image-grounded encoder's states of the question (B, Tq, D) and its mask: the answer decoder's memory."""
        return self.text(question_ids, question_mask, image_embeds=image_embeds, mode="multimodal"), question_mask

    # ----------------------------------------------------------------------------------------------
    # inference (retrieval evaluation, CapFilt); run under model.eval()

    image_feat_tokens = 1
    """ITC features per image: the [CLS] projection."""

    def eval_root_parameters(self) -> list[nn.Parameter]:
        """Parameters read outside a submodule's forward during evaluation (none: temp only scales training)."""
        return []

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) → (image_embeds (B, 1+P, Dv), image_feat (B, 1, E) normalised)."""
        self._check_matching_heads()
        image_embeds = self.visual_encoder(pixel_values)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, :1]), dim=-1)

    @torch.no_grad()
    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) [CLS]-first text → text_feat (B, E) normalised."""
        self._check_matching_heads()
        return self._text_feat(self.text, self.text_proj, text_ids, text_mask)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompt_ids: Optional[torch.Tensor] = None, *,
                 question_ids: Optional[torch.Tensor] = None, question_mask: Optional[torch.Tensor] = None,
                 answer_ids: Optional[torch.Tensor] = None, answer_mask: Optional[torch.Tensor] = None,
                 k_test: int = 128, max_new_tokens: int = 30, min_new_tokens: int = 1, num_beams: int = 1,
                 length_penalty: float = 1.0, synced_gpus: bool = False, **unused: object) -> torch.Tensor:
        """Captions from BLIP's image-grounded decoder: (B, max_new_tokens) ids after `prompt_ids`, greedy or by
        beam search (num_beams > 1: `models.beam_search`, transformers' rules; BLIP captions with 3 beams).

        prompt_ids: (B, P) [DEC] then the prompt's tokens (BLIP captions after "a picture of "; none in
        pretraining), the same length in every row. A caption ends with [SEP], then [PAD]; all steps run on
        every rank (`synced_gpus` is implied). Other generation options (eos ids) do not apply: [SEP] ends.

        A VQA model (model.objective=vqa) answers question_ids ([ENC] first) / question_mask (B, Tq) instead: with
        answer_ids / answer_mask (C, Ta), candidates [DEC] answer [SEP], it returns the best candidate's ids after
        [DEC] (`rank_answers`, k_test of them scored in full); without, it decodes after [DEC] as captions are.
        """
        if self.objective == "vqa":
            return self._answer(pixel_values, question_ids, question_mask, answer_ids, answer_mask, k_test,
                                max_new_tokens, min_new_tokens, num_beams, length_penalty)
        if prompt_ids is None:
            raise ValueError("prompt_ids: a captioning model generates after [DEC] and its prompt")
        image_embeds = self._decoder_image_embeds(pixel_values)  # (B, 1+P, Dv)
        return generate_after(self.text, image_embeds, None, prompt_ids, max_new_tokens, min_new_tokens, num_beams,
                              length_penalty, self.tokens.sep, self.tokens.pad)

    def _answer(self, pixel_values: torch.Tensor, question_ids: Optional[torch.Tensor],
                question_mask: Optional[torch.Tensor], answer_ids: Optional[torch.Tensor],
                answer_mask: Optional[torch.Tensor], k_test: int, max_new_tokens: int, min_new_tokens: int,
                num_beams: int, length_penalty: float) -> torch.Tensor:
        if question_ids is None or question_mask is None:
            raise ValueError("question_ids / question_mask: a VQA model answers questions (BlipVQACollator)")
        if answer_ids is not None:
            best = self.rank_answers(pixel_values, question_ids, question_mask, answer_ids, answer_mask, k_test)
            return answer_ids.to(best.device)[best, 1:]  # (B, Ta-1)
        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+P, Dv)
        states, mask = self._question_states(image_embeds, question_ids, question_mask)
        start = torch.full_like(question_ids[:, :1], self.tokens.dec)  # (B, 1) [DEC]
        return generate_after(self.text_decoder, states, mask, start, max_new_tokens, min_new_tokens, num_beams,
                              length_penalty, self.tokens.sep, self.tokens.pad)

    @torch.no_grad()
    def rank_answers(self, pixel_values: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                     answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int = 128) -> torch.Tensor:
        """BLIP's ranking inference over C candidate answers (answer_ids / answer_mask (C, Ta): [DEC] answer [SEP],
        right-padded): the k candidates whose first token the decoder finds likeliest after [DEC] are scored by
        their whole log-likelihood (every token and [SEP]); returns each question's best candidate (B,). (The
        authors score with their label-smoothed loss; this is the plain log-likelihood.) Every rank runs the same
        two decoder calls whatever the questions are (ZeRO-3)."""
        if self.objective != "vqa":
            raise ValueError(f"model.objective={self.objective}: only a VQA model (model.objective=vqa) ranks answers")
        device = pixel_values.device
        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+P, Dv)
        states, mask = self._question_states(image_embeds, question_ids, question_mask)  # (B, Tq, D)
        return rank_candidates(self.text_decoder, states, mask, answer_ids.to(device), answer_mask.to(device), k)

    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor, bos_id: int, sep_id: int, pad_id: int,
                          max_len: int = 30, num_beams: int = 1, top_p: Optional[float] = None,
                          num_captions: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """CapFilt's captioner: (B * num_captions, max_len) ids, column 0 `bos_id` ([DEC]), image 0's captions
        first; greedy (top_p None) or nucleus sampling (BLIP: top_p 0.9) from `generator` (or torch's global
        RNG). A captioner fine-tuned after a prompt reads it after `bos_id`; the ids returned leave it out. The
        same contract as Blip2Stage1.generate_captions, so tools/capfilt.py takes either model."""
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: only greedy/nucleus decoding (num_beams=1) is implemented")
        if (sep_id, pad_id) != (self.tokens.sep, self.tokens.pad):
            raise ValueError(f"sep/pad ids {sep_id}/{pad_id} are not the model's {self.tokens.sep}/{self.tokens.pad}")
        image_embeds = self._decoder_image_embeds(pixel_values).repeat_interleave(num_captions, dim=0)
        start = torch.tensor([bos_id, *self.prompt_ids], dtype=torch.long, device=image_embeds.device)
        ids = decode(self.text, image_embeds, start.expand(image_embeds.shape[0], -1), max_len - 1, 1, self.tokens.sep,
                     self.tokens.pad, top_p=top_p, generator=generator)
        return torch.cat([ids[:, :1], ids[:, start.numel():]], dim=1)  # the prompt is not the caption's

    def _decoder_image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.arch != "blip":
            raise ValueError(f"model.arch={self.arch} has no text decoder: only BLIP generates captions")
        if self.objective in ("retrieval", "vqa"):
            raise ValueError(f"a {self.objective} fine-tuning run (model.objective={self.objective}) does not train the "
                             "decoder: caption with a pretraining or captioning run")
        return self.visual_encoder(pixel_values)  # (B, 1+P, Dv)

    def _check_matching_heads(self) -> None:
        if self.objective in ("caption", "vqa"):
            raise ValueError(f"a {'captioning' if self.objective == 'caption' else 'VQA'} run (model.objective="
                             f"{self.objective}) does not train the ITC / ITM heads: match or retrieve with a "
                             "pretraining or retrieval run")

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                   probability: bool = False) -> torch.Tensor:
        """Matching score of each (image, text) pair for [CLS]-first text: the positive-class logit (B,), as BLIP
        ranks by; probability=True gives P(match) (CapFilt's filter keeps texts it calls matched)."""
        self._check_matching_heads()
        if self.arch == "blip":  # the image-grounded encoder reads [ENC] where the collator put [CLS]
            text_ids = torch.cat([torch.full_like(text_ids[:, :1], self.tokens.enc), text_ids[:, 1:]], dim=1)
        logits = self._itm_logits(image_embeds, text_ids, text_mask)  # (B, 2)
        return logits.float().softmax(-1)[:, 1] if probability else logits[:, 1]
