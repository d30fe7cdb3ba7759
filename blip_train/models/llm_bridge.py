"""BLIP-2 stage 2 and InstructBLIP: frozen ViT → Q-Former queries → Linear → frozen HF LLM.

One module serves both (`cfg.arch` = "stage2" | "instruct") and both LLM kinds:
- decoder-only (OPT, LLaMA/Vicuna): LLM input [proj(queries); embed(llm_input_ids)], labels -100 on
  the query positions (the collator already masked bos, prompt/instruction and padding); the HF
  model's own shifted LM loss.
- encoder-decoder (FlanT5): encoder input [proj(queries); embed(llm_input_ids)] (the prefix or the
  instruction), decoder targets llm_labels (shifted right into decoder inputs as T5 does); the
  cross-entropy is taken here on fp32 logits (T5 would take it on its bf16 logits).
- InstructBLIP: the instruction (qformer_input_ids) enters the Q-Former after the queries with the
  bidirectional mask, so queries attend to it; only the query positions' outputs go to the LLM.
- BLIP-2 VQA fine-tuning (stage2 with `cfg.qformer_text_input`): the question enters the Q-Former
  the same way, through the same code (`text_to_qformer`); only generation defaults differ.
The batch contract is in `data/llm_collate.py`. Plain stage 2 never feeds text to the Q-Former, so its
text branch (word/position embeddings, text FFNs, LM head) is removed, as in transformers'
Blip2ForConditionalGeneration; InstructBLIP and question-aware stage 2 keep all but the LM head.

ZeRO-3: every step calls the same modules in the same order (vision → ln_vision → Q-Former →
llm_proj → LLM embeddings → LLM) whatever the data. `generate` reads `query_tokens` outside any
module forward: under ZeRO-3 the caller gathers it (`blip_train.distributed.zero.gathered`).
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from blip_train.config.schema import LLMConfig, ModelConfig
from blip_train.models.audio_encoder import load_audio_encoder
from blip_train.models.point_encoder import load_point_encoder
from blip_train.models.eva_vit import LayerNormFP32
from blip_train.models.freezing import freeze_
from blip_train.models.lora import apply_lora_, set_lora_dropout_mode_
from blip_train.models.qformer import QFormer
from blip_train.models.stage1 import build_vision_tower, expand_query_tokens

IGNORE_INDEX = -100
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def llm_dtype(name: str, device_type: str) -> torch.dtype:
    """Dtype of the frozen LLM; fp16 only on CUDA (CPU fp16 kernels are incomplete, DeepSpeed refuses it)."""
    if name not in _DTYPES:
        raise ValueError(f"model.llm.dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    if name == "fp16" and device_type != "cuda":
        raise ValueError("model.llm.dtype: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return _DTYPES[name]


def load_llm(cfg: LLMConfig, device_type: Optional[str] = None) -> PreTrainedModel:
    """The frozen LLM from its local HF folder: AutoModelForSeq2SeqLM for encoder-decoder configs
    (FlanT5), AutoModelForCausalLM otherwise (OPT, LLaMA/Vicuna), in `cfg.dtype`, frozen."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_cfg = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    cls = AutoModelForSeq2SeqLM if hf_cfg.is_encoder_decoder else AutoModelForCausalLM
    llm = cls.from_pretrained(cfg.path, dtype=llm_dtype(cfg.dtype, device_type), local_files_only=True)
    return freeze_(llm)


def drop_qformer_text_branch_(qformer: QFormer, keep_text_input: bool) -> None:
    """Remove Q-Former parts the LLM stages never run (so they are neither trained nor stored).

    Always the LM head (stage-1 ITG only); unless `keep_text_input` (InstructBLIP), also the word and
    position embeddings and every layer's text FFN: with queries only, QFormer.forward never reaches
    them. Mirrors transformers' Blip2ForConditionalGeneration / InstructBlip Q-Formers.
    """
    qformer.lm_head = None
    if not keep_text_input:
        qformer.embeddings.word_embeddings = None
        qformer.embeddings.position_embeddings = None
        for layer in qformer.layers:
            layer.ffn = None


class Blip2LLM(nn.Module):
    """Frozen ViT (or, model.modality audio | 3d, frozen audio | point-cloud encoder) + trainable ln_vision,
    Q-Former, query tokens and llm_proj + frozen HF `llm` (with trainable LoRA adapters when cfg.llm.lora.r > 0)."""

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel, *, device_type: Optional[str] = None,
                 visual_encoder: Optional[nn.Module] = None, audio_encoder: Optional[nn.Module] = None,
                 points_encoder: Optional[nn.Module] = None, prefix_ids: Sequence[int] = ()) -> None:
        """cfg.arch: stage2 | instruct. `llm` (see `load_llm`) is frozen here if it is not already.
        visual_encoder: the ViT already built (e.g. partitioned as it was built); default: built here.
        audio_encoder: model.modality=audio: the frozen `AudioEncoder`; default: loaded from model.audio.encoder.
        points_encoder: model.modality=3d: the frozen `PointEncoder`; default: loaded from model.points.encoder.
        prefix_ids: the LLM tokens of model.modality_prefix, put before the soft prompt."""
        super().__init__()
        if cfg.arch not in ("stage2", "instruct"):
            raise ValueError(f"model.arch={cfg.arch!r}: Blip2LLM serves stage2 | instruct")
        self.instruct = cfg.arch == "instruct"
        # Text enters the Q-Former (InstructBLIP's instruction, or the question of BLIP-2 VQA fine-tuning).
        self.text_to_qformer = self.instruct or cfg.qformer_text_input
        self.audio = cfg.modality == "audio"
        self.points = cfg.modality == "3d"
        if self.points:
            # A cloud is one encoder input (points, channels), read whole: no pieces.
            self.vision_frozen = True
            self.points_encoder = freeze_(points_encoder if points_encoder is not None else load_point_encoder(
                cfg.points.encoder, next(llm.parameters()).dtype))
            width, eps, pieces = self.points_encoder.width, self.points_encoder.layer_norm_eps, 0
        elif self.audio:
            # The encoder's tokens take the ViT's place; it is always frozen (X-InstructBLIP).
            self.vision_frozen = True
            self.audio_encoder = freeze_(audio_encoder if audio_encoder is not None else load_audio_encoder(
                cfg.audio, next(llm.parameters()).dtype))
            width, pieces = self.audio_encoder.width, cfg.audio.segments
            eps = self.audio_encoder.ast.config.layer_norm_eps
        else:
            self.vision_frozen = cfg.vision.frozen
            self.visual_encoder = (visual_encoder if visual_encoder is not None
                                   else build_vision_tower(cfg, device_type))
            width, eps, pieces = cfg.vision.width, cfg.vision.layer_norm_eps, cfg.video_frames
        # Dimensions of one encoder input: an image (3, H, W), an audio segment (frames, bins) or a cloud (points,
        # channels). One more in front is a clip of several (video frames, audio segments).
        self.sample_dims = 2 if self.audio or self.points else 3
        self.ln_vision = LayerNormFP32(width, eps=eps)
        qcfg = cfg.qformer
        self.qformer = QFormer(qcfg, encoder_width=width, attention=cfg.attention)
        drop_qformer_text_branch_(self.qformer, keep_text_input=self.text_to_qformer)
        self.query_tokens = nn.Parameter(torch.randn(1, qcfg.num_query_tokens, qcfg.hidden_size) * 0.02)
        # Video (audio): a learned embedding of each frame's (segment's) place in the clip, added to its query
        # outputs. Zeros at the start, so a model fine-tuned on video starts from the image model's soft prompt for
        # each frame.
        self.frame_pos = nn.Parameter(torch.zeros(pieces, qcfg.hidden_size)) if pieces else None
        self.llm_proj = nn.Linear(qcfg.hidden_size, llm.config.get_text_config().hidden_size)
        self.llm = freeze_(llm)
        # After the base weights are in (and, under ZeRO-3, partitioned): see models/lora.py.
        self.lora_modules = apply_lora_(self.llm, cfg.llm.lora)
        self.decoder_only = not llm.config.is_encoder_decoder
        # Not a parameter and not saved: it is the config's text, tokenized again by every build.
        self.register_buffer("prefix_ids", torch.tensor(list(prefix_ids), dtype=torch.long), persistent=False)

    @property
    def encoder(self) -> nn.Module:
        """The frozen (or training) tower the Q-Former reads: the ViT, the audio or the point-cloud encoder."""
        if self.points:
            return self.points_encoder
        return self.audio_encoder if self.audio else self.visual_encoder

    def train(self, mode: bool = True) -> "Blip2LLM":
        super().train(mode)  # the frozen towers stay in eval mode (freeze_)
        if self.lora_modules:
            set_lora_dropout_mode_(self.llm, mode)
        return self

    # ----------------------------------------------------------------------------------------------
    # building blocks

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images, (B, frames, bins) audio segments or (B, points, channels) clouds →
        ln_vision(encoder(x)) (B, N, W) in the Q-Former's dtype."""
        with torch.no_grad() if self.vision_frozen else nullcontext():
            embeds = self.encoder(pixel_values)  # (B, N, W) in the tower's dtype
        return self.ln_vision(embeds).to(self.query_tokens.dtype)  # ln_vision computes fp32

    def soft_prompt(self, pixel_values: torch.Tensor, qformer_input_ids: Optional[torch.Tensor] = None,
                    qformer_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Query outputs projected to the LLM width: (B, Nq, H_llm) for images (B, 3, H, W); for video frames
        (B, F, 3, H, W) or audio segments (B, F, frames, bins), each piece's queries plus its position embedding,
        in time order: (B, F*Nq, H_llm). InstructBLIP needs the instruction, question-aware stage 2 the question
        (qformer_input_ids), which every piece's Q-Former pass reads."""
        if self.text_to_qformer and qformer_input_ids is None:
            raise ValueError("this model feeds text to the Q-Former (model.arch=instruct or "
                             "model.qformer_text_input): the batch needs qformer_input_ids")
        b = pixel_values.shape[0]
        frames = pixel_values.shape[1] if pixel_values.dim() == self.sample_dims + 2 else 0
        if frames or self.audio:
            if self.frame_pos is None or frames > self.frame_pos.shape[0] or (self.audio and not frames):
                what, key = ("audio segments", "model.audio.segments") if self.audio else ("video frames",
                                                                                           "model.video_frames")
                raise ValueError(f"{frames} {what} per sample, this model takes "
                                 f"{0 if self.frame_pos is None else self.frame_pos.shape[0]} ({key})")
            pixel_values = pixel_values.flatten(0, 1)  # (B*F, 3, H, W), frames of a sample together
            if self.text_to_qformer:
                qformer_input_ids = qformer_input_ids.repeat_interleave(frames, dim=0)
                qformer_attention_mask = qformer_attention_mask.repeat_interleave(frames, dim=0)
        image_embeds = self.image_embeddings(pixel_values)  # (B[*F], Nimg, W)
        queries = expand_query_tokens(self.query_tokens, pixel_values.shape[0])  # (B[*F], Nq, D)
        out = self.qformer(query_embeds=queries, image_embeds=image_embeds,
                           input_ids=qformer_input_ids if self.text_to_qformer else None,
                           attention_mask=qformer_attention_mask if self.text_to_qformer else None,
                           mask="bidirectional")
        q = out.last_hidden_state[:, :queries.shape[1]]  # (B[*F], Nq, D)
        if frames:
            q = q.unflatten(0, (b, frames)) + self.frame_pos[:frames, None, :].to(q.dtype)  # (B, F, Nq, D)
            q = q.flatten(1, 2)  # (B, F*Nq, D)
        return self.llm_proj(q)  # (B, [F*]Nq, H_llm)

    def llm_inputs(self, soft: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[modality prefix; soft prompt; embedded text] (B, P + Nq + T, H) in the LLM's dtype, and its mask."""
        embed = self.llm.get_input_embeddings()
        text = embed(input_ids)  # (B, T, H)
        parts = [soft.to(text.dtype), text]
        if self.prefix_ids.numel():
            parts.insert(0, embed(self.prefix_ids.to(input_ids.device)).expand(text.shape[0], -1, -1))
        embeds = torch.cat(parts, dim=1)
        fixed = embeds.shape[1] - text.shape[1]
        mask = torch.cat([torch.ones(text.shape[0], fixed, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        return embeds, mask

    # ----------------------------------------------------------------------------------------------
    # training

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LM loss of one micro-batch (keys: see data/llm_collate.py). Returns loss and loss_lm (equal)."""
        soft = self.soft_prompt(batch["pixel_values"], batch.get("qformer_input_ids"),
                                batch.get("qformer_attention_mask"))
        embeds, mask = self.llm_inputs(soft, batch["llm_input_ids"], batch["llm_attention_mask"])
        labels = batch["llm_labels"]
        if self.decoder_only:
            # Query positions are never targets; the HF model shifts labels and takes the mean CE
            # over the remaining targets (logits upcast to fp32).
            ignore = torch.full((labels.shape[0], embeds.shape[1] - labels.shape[1]), IGNORE_INDEX, dtype=labels.dtype,
                                device=labels.device)  # prefix and query positions
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=torch.cat([ignore, labels], dim=1))
            loss = out.loss
        else:
            # The loss is ours, on fp32 logits: T5 takes its cross-entropy on the bf16 logits as they come
            # (the decoder-only models upcast). Decoder inputs are the labels shifted right, as T5 builds
            # them from `labels` itself (-100 -> pad).
            dec_in = self.llm.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = self.llm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec_in).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)  # (B*T', V) fp32 vs (B*T',)
        return {"loss": loss, "loss_lm": loss.detach()}

    # ----------------------------------------------------------------------------------------------
    # inference (under model.eval(); under ZeRO-3 all ranks call it together with synced_gpus=True
    # and `query_tokens` gathered by the caller)

    def eval_root_parameters(self) -> list[nn.Parameter]:
        """Parameters read outside a submodule's forward during generation: ZeRO-3 callers gather them."""
        return [self.query_tokens] + ([self.frame_pos] if self.frame_pos is not None else [])

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, llm_input_ids: Optional[torch.Tensor] = None,
                 llm_attention_mask: Optional[torch.Tensor] = None,
                 qformer_input_ids: Optional[torch.Tensor] = None,
                 qformer_attention_mask: Optional[torch.Tensor] = None, **options: Any) -> torch.Tensor:
        """Token ids generated by the LLM after [soft prompt; llm_input_ids] (options: see `generate_from`).

        llm_input_ids: decoder-only: [bos] prompt, LEFT-padded (None: bos only); encoder-decoder: the
        encoder text (None: queries only). InstructBLIP: qformer_input_ids is the instruction.
        Returns (B * num_return_sequences, L): decoder-only the new tokens only, encoder-decoder the
        decoder sequence (starting with the decoder start token); decode with skip_special_tokens.
        """
        soft = self.soft_prompt(pixel_values, qformer_input_ids, qformer_attention_mask)
        embeds, mask = self.llm_inputs(soft, *self.text_or_start(llm_input_ids, llm_attention_mask, soft.shape[0],
                                                                 soft.device))
        return self.generate_from(embeds, mask, **options)

    def text_or_start(self, llm_input_ids: Optional[torch.Tensor], llm_attention_mask: Optional[torch.Tensor],
                      batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM text after the soft prompt and its mask: as given, or (None) the start a caption needs, bos for a
        decoder-only LLM and nothing for an encoder-decoder."""
        if llm_input_ids is None:
            start = [self.llm.config.bos_token_id] if self.decoder_only else []
            llm_input_ids = torch.tensor([start] * batch, dtype=torch.long, device=device).view(batch, len(start))
            return llm_input_ids, torch.ones_like(llm_input_ids)
        return llm_input_ids, (torch.ones_like(llm_input_ids) if llm_attention_mask is None else llm_attention_mask)

    @torch.no_grad()
    def generate_from(self, embeds: torch.Tensor, mask: torch.Tensor, *, num_beams: int = 5, max_new_tokens: int = 30,
                      min_new_tokens: int = 1, repetition_penalty: Optional[float] = None, length_penalty: float = 1.0,
                      do_sample: bool = False, top_p: float = 0.9, temperature: float = 1.0,
                      num_return_sequences: int = 1, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                      synced_gpus: bool = False, **generate_kwargs: Any) -> torch.Tensor:
        """The LLM's generation after the input embeddings `embeds` (B, L, H) and their mask.

        repetition_penalty: None = InstructBLIP's 1.5 for model.arch=instruct, 1.0 (none) for stage 2.
        eos_token_id: stop token(s), e.g. the id of "\\n" for OPT stage 2 (None: the LLM's own).
        synced_gpus: True under ZeRO-3 on several ranks (a finished rank keeps running forwards).
        """
        if repetition_penalty is None:
            repetition_penalty = 1.5 if self.instruct else 1.0
        kwargs: dict[str, Any] = dict(
            num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty, do_sample=do_sample,
            num_return_sequences=num_return_sequences, synced_gpus=synced_gpus,
            pad_token_id=self.llm.config.pad_token_id)
        if do_sample:
            kwargs.update(top_p=top_p, temperature=temperature)
        if eos_token_id is not None:
            kwargs["eos_token_id"] = eos_token_id
        kwargs.update(generate_kwargs)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


# --------------------------------------------------------------------------------------------------
# initialisation from an earlier stage

STAGE1_ONLY = ("vision_proj.", "text_proj.", "itm_head.", "temp")
"""Stage-1 heads the LLM stages do not have (ITC projections, ITM head, temperature)."""


ENCODER_SIDE = r"(ln_vision\.|qformer\.layers\.\d+\.cross_attn\.)"
"""The trainable parts that read the frozen encoder's tokens: their shapes follow its width."""


def _optional_missing(model: Blip2LLM) -> tuple[str, ...]:
    # llm_proj is new after stage 1; the Q-Former text input (InstructBLIP, question-aware stage 2) is
    # absent from a stage-2 checkpoint (its text branch was removed) and keeps its current init (BERT or random).
    keys = (r"llm_proj\.", r"llm\..*\.lora_[AB]\.", r"frame_pos$")  # adapters and frame embeddings: new unless the earlier run had them
    if not model.vision_frozen:  # a training ViT starts from model.vision.weights unless the run trained it too
        keys += (r"visual_encoder\.",)
    if model.text_to_qformer:
        keys += (r"qformer\.embeddings\.(word|position)_embeddings\.", r"qformer\.layers\.\d+\.ffn\.")
    return keys


def _not_ours(model: Blip2LLM) -> tuple[str, ...]:
    # Trained in stage 1, without a place here: the heads, the Q-Former LM head, and (stage 2) the
    # Q-Former text branch; frozen towers come from their recorded sources, never from a checkpoint.
    keys = tuple(re.escape(k) for k in STAGE1_ONLY) + (r"qformer\.lm_head\.", r"visual_encoder\.", r"audio_encoder\.",
                                                       r"points_encoder\.", r"llm\.")
    if not model.text_to_qformer:
        keys += (r"qformer\.embeddings\.(word|position)_embeddings\.", r"qformer\.layers\.\d+\.ffn\.")
    return keys


def init_from_earlier_stage_(model: Blip2LLM, state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy the trainable weights an earlier stage shares with `model` (our key names).

    `state` is a stage-1, stage-2 or InstructBLIP state dict (consolidated fp32 or safetensors).
    Loaded: ln_vision, qformer, query_tokens, and llm_proj when present with the same shape.
    Expected to be unused: vision_proj, text_proj, itm_head, temp, qformer.lm_head (and, for
    stage 2, the Q-Former text branch), plus any frozen tower weights. Expected to be missing:
    llm_proj (from stage 1) and, for InstructBLIP from a stage-2 checkpoint, the Q-Former text input.
    A checkpoint whose ln_vision has another width (an image Q-Former for an audio / 3D model, as X-InstructBLIP
    starts each modality's) gives everything but ln_vision and the cross-attention, which stay new.
    Any other missing or unexpected key raises. Returns {"loaded", "missing", "unused"} key lists.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optional = _optional_missing(model)
    theirs = state.get("ln_vision.weight")
    if theirs is not None and "ln_vision.weight" in params and theirs.shape != params["ln_vision.weight"].shape:
        # Another encoder's checkpoint (an image Q-Former for an audio or 3D model: X-InstructBLIP starts every
        # modality's Q-Former from BLIP-2's): everything but the parts that read the encoder, which stay new.
        state = {k: v for k, v in state.items() if not re.match(ENCODER_SIDE, k)}
        optional += (ENCODER_SIDE,)
    unused = [k for k in state if k not in params and any(re.match(p, k) for p in _not_ours(model))]
    unexpected = sorted(k for k in state if k not in params and k not in unused)
    missing = sorted(k for k in params if k not in state)
    bad_missing = [k for k in missing if not any(re.match(p, k) for p in optional)]
    if unexpected or bad_missing:
        raise KeyError(f"init_from: unexpected keys {unexpected[:6]}, missing trainable keys {bad_missing[:6]} "
                       f"(is it a BLIP-2 checkpoint with the same model.qformer / model.vision sizes?)")
    loaded = sorted(k for k in params if k in state)
    with torch.no_grad():
        for name in loaded:
            if params[name].shape != state[name].shape:
                raise ValueError(f"init_from: {name} has shape {tuple(state[name].shape)}, "
                                 f"the model {tuple(params[name].shape)}")
            params[name].copy_(state[name].to(params[name].dtype))
    return {"loaded": loaded, "missing": missing, "unused": sorted(unused)}
