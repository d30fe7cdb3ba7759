"""Per-architecture builders: config → model (+ tokenizer, collator, data kind). One explicit dict.

A builder constructs the model with the SAME seed on every rank (so an un-partitioned init is identical
everywhere), loads frozen towers from their recorded sources, and says how to build its data loader.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from blip_train.config import ConfigError, ExperimentConfig
from blip_train.models.freezing import count_parameters
from blip_train.models.world import WorldInfo


@dataclass
class Stage:
    model: nn.Module
    tokenizer: Any
    collate: Callable
    data_kind: str
    cfg: ExperimentConfig
    frozen_sources: dict = field(default_factory=dict)
    _loader: Any = None

    def build_train_loader(self):
        from blip_train.data.datasets import build_train_loader, model_input_reader
        self._loader = build_train_loader(self.cfg.data, self.cfg.train.micro_batch_size, self.collate,
                                          kind=self.data_kind, frames=self.cfg.model.video_frames,
                                          reader=model_input_reader(self.cfg.model))
        return self._loader

    def skipped_samples(self) -> int:
        """Corrupt samples skipped so far on this rank (0 before the loader exists)."""
        return self._loader.dataset.num_corrupt if self._loader is not None else 0


def _require_file(key: str, path: str) -> None:
    from pathlib import Path
    if path and not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist")


def build_partitioned_vision(cfg: ExperimentConfig, device_type: str | None, ds_config: dict | None,
                             param_swapper: Any = None):
    """The frozen ViT built as ZeRO-3 partitions in its final dtype and loaded partition by partition, when
    the run is ZeRO-3 with deepspeed.zero_init; None otherwise (the model builds it whole, as inference
    tools do). Built whole, ViT-g is 4 GB of fp32 on every rank before it is cast and partitioned.

    Call right after seeding the model's init: the tower's initialisation draws the same random numbers
    as a whole build (see EVAViT.reset_parameters), so the trainable parts that follow get the same init.
    param_swapper: with NVMe offload, the swapper of a tower already built (see zero.nvme_swapper_of).
    """
    from blip_train.distributed.zero import maybe_zero_init, with_precision, zero_stage
    from blip_train.models.eva_vit import EVAViT, load_vit_weights_partitioned
    from blip_train.models.freezing import freeze_
    from blip_train.models.stage1 import frozen_vision_dtype

    v = cfg.model.vision
    if ds_config is None or not cfg.deepspeed.zero_init or zero_stage(ds_config) != 3 or not v.frozen:
        return None
    dtype = frozen_vision_dtype(v.precision, device_type or ("cuda" if torch.cuda.is_available() else "cpu"))
    with maybe_zero_init(True, with_precision(ds_config, dtype), param_swapper):
        vit = EVAViT(v, attention=cfg.model.attention)
    if v.weights:
        load_vit_weights_partitioned(vit, v.weights)
    return freeze_(vit)


def build_stage1_model(cfg: ExperimentConfig, world: WorldInfo | None = None, device_type: str | None = None,
                       ds_config: dict | None = None):
    """Blip2Stage1 with the Q-Former tokenizer; frozen ViT weights loaded from model.vision.weights.
    ds_config: the run's DeepSpeed config when training (ZeRO-3 builds the ViT partitioned)."""
    from blip_train.data.tokenizers import load_qformer_tokenizer
    from blip_train.models.eva_vit import load_vit_weights
    from blip_train.models.qformer import load_bert_weights
    from blip_train.models.stage1 import Blip2Stage1

    m = cfg.model
    if not m.qformer.tokenizer:
        raise ConfigError("model.qformer.tokenizer: required (a local BERT tokenizer folder)")
    _require_file("model.qformer.tokenizer", m.qformer.tokenizer)
    _require_file("model.vision.weights", m.vision.weights)
    _require_file("model.qformer.bert_init", m.qformer.bert_init)
    tokenizer = load_qformer_tokenizer(m.qformer.tokenizer)
    if len(tokenizer) > m.qformer.vocab_size:
        raise ConfigError(f"model.qformer.vocab_size: {m.qformer.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens ({m.qformer.tokenizer})")
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    vit = build_partitioned_vision(cfg, device_type, ds_config)
    model = Blip2Stage1(m, world, device_type=device_type, visual_encoder=vit)
    if m.vision.weights and vit is None:
        load_vit_weights(model.visual_encoder, m.vision.weights)
    if m.qformer.bert_init:
        load_bert_weights(model.qformer, m.qformer.bert_init)
    return model, tokenizer


def load_trained_retrieval_model(cfg: ExperimentConfig, ckpt_dir: Path, tag: str, untrained: bool = False,
                                 device_type: str | None = None):
    """(model, tokenizer) of a finished run with ITC/ITM heads (model.arch stage1 | blip | albef) for inference
    (eval, CapFilt): the arch's builder (a frozen ViT from its recorded source), then the trainable weights
    consolidated from the ZeRO shards of `ckpt_dir/tag`, loaded strictly. untrained=True gives the step-0
    weights instead (same seed, then model.init_from as in training)."""
    from blip_train.training.weights import consolidate_trainable, load_trainable_

    if cfg.model.arch in ("blip", "albef"):
        # build_blip_model applies model.init_from itself: only wanted for the step-0 weights.
        keep = cfg if untrained else replace(cfg, model=replace(cfg.model, init_from=""))
        model, tokenizer = build_blip_model(keep)
    else:
        model, tokenizer = build_stage1_model(cfg, device_type=device_type)
    if not untrained:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        load_trainable_(model, consolidate_trainable(ckpt_dir, tag, names))
    elif cfg.model.init_from and cfg.model.arch == "stage1":  # step 0 started from the earlier weights, as training
        from blip_train.training.weights import init_stage1_from_
        init_stage1_from_(model, cfg.model.init_from)
    return model, tokenizer


def build_stage1(cfg: ExperimentConfig, world: WorldInfo, on_cuda: bool, ds_config: dict | None = None) -> Stage:
    from blip_train.data.collate import Stage1Collator

    model, tokenizer = build_stage1_model(cfg, world, "cuda" if on_cuda else "cpu", ds_config)
    if cfg.model.init_from:
        from blip_train.distributed.process_group import print0
        from blip_train.training.weights import init_stage1_from_
        kept = init_stage1_from_(model, cfg.model.init_from)
        print0(f"init_from {cfg.model.init_from}: loaded; kept initial values for {_prefixes(kept)}")
    return Stage(model=model, tokenizer=tokenizer, collate=Stage1Collator(tokenizer, cfg.model.max_txt_len),
                 data_kind="caption", cfg=cfg,
                 frozen_sources={"vision": cfg.model.vision.weights or "random-init"})


# ------------------------------------------------------------------------------ stage 2 / InstructBLIP

END_OF_TEXT = {"opt": "\n"}
"""Text that ends a stage-2 target, per LLM family (BLIP-2 trains OPT with "\n"); others: the eos token."""


def _read_init_state(path: str) -> dict[str, torch.Tensor]:
    """Trainable weights (our names) of an earlier run / checkpoint tag, a consolidated file, or a weights
    folder from tools/ (zero_to_safetensors, import_hf, import_lavis). Every trainable key of the earlier
    stage is kept (its heads too, so that unused keys can be named)."""
    from blip_train.training.weights import read_init_weights

    return read_init_weights(path)


def build_llm_stage_model(cfg: ExperimentConfig, device_type: str | None = None, ds_config: dict | None = None,
                          llm: nn.Module | None = None):
    """Blip2LLM (stage2 | instruct) with the frozen ViT and LLM loaded from their sources, the shared
    parts initialised from model.init_from. Returns (model, llm tokenizer, init report or None).
    ds_config: the run's DeepSpeed config when training (ZeRO-3 builds the ViT partitioned).
    llm: an LLM already loaded from model.llm.path, to share (several modalities' models at inference)."""
    from blip_train.data.llm_collate import load_llm_tokenizer
    from blip_train.distributed.zero import nvme_swapper_of
    from blip_train.models.eva_vit import load_vit_weights
    from blip_train.models.llm_bridge import Blip2LLM, init_from_earlier_stage_, load_llm

    m = cfg.model
    for key, path in (("model.llm.path", m.llm.path), ("model.vision.weights", m.vision.weights),
                      ("model.qformer.bert_init", m.qformer.bert_init), ("model.init_from", m.init_from)):
        _require_file(key, path)
    llm_tokenizer = load_llm_tokenizer(m.llm.path)
    prefix = llm_tokenizer(m.modality_prefix, add_special_tokens=False).input_ids if m.modality_prefix else []
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    llm = llm if llm is not None else load_llm(m.llm, device_type)
    if m.modality == "audio":
        from blip_train.models.audio_encoder import load_audio_encoder

        _require_file("model.audio.encoder", m.audio.encoder)
        # Inside the trainer's HfDeepSpeedConfig scope (ZeRO-3) transformers loads it partitioned, as the LLM.
        audio = load_audio_encoder(m.audio, next(llm.parameters()).dtype)  # the LLM's, as loaded
        model = Blip2LLM(m, llm, device_type=device_type, audio_encoder=audio, prefix_ids=prefix)
    elif m.modality == "3d":
        from blip_train.models.point_encoder import load_point_encoder

        _require_file("model.points.encoder", m.points.encoder)
        # Built whole (22M parameters at ULIP-2's size) in the LLM's dtype; the engine partitions it under ZeRO-3.
        points = load_point_encoder(m.points.encoder, next(llm.parameters()).dtype)
        model = Blip2LLM(m, llm, device_type=device_type, points_encoder=points, prefix_ids=prefix)
    else:
        vit = build_partitioned_vision(cfg, device_type, ds_config, param_swapper=nvme_swapper_of(llm))
        model = Blip2LLM(m, llm, device_type=device_type, visual_encoder=vit, prefix_ids=prefix)
        if m.vision.weights and vit is None:
            load_vit_weights(model.visual_encoder, m.vision.weights)
    if m.qformer.bert_init:
        # Before init_from: a stage-2 checkpoint lacks InstructBLIP's Q-Former text input (kept from BERT).
        _load_bert_weights_present(model, m.qformer.bert_init)
    report = init_from_earlier_stage_(model, _read_init_state(m.init_from)) if m.init_from else None
    return model, llm_tokenizer, report


def _load_bert_weights_present(model: nn.Module, folder: str) -> None:
    """bert-base init of the Q-Former parts that exist here (stage 2 removed the text branch)."""
    from blip_train.models.qformer import QFormer, load_bert_weights

    # load_bert_weights wants the whole Q-Former: fill a complete one, copy what this model kept.
    full = QFormer(model.qformer.cfg, encoder_width=model.ln_vision.weight.shape[0])
    load_bert_weights(full, folder)
    ours = model.qformer.state_dict()
    with torch.no_grad():
        for name, value in full.state_dict().items():
            if name in ours:
                ours[name].copy_(value)


def _describe_init(report: dict | None, source: str) -> str:
    if report is None:
        return "random init"
    return (f"{source}: loaded {len(report['loaded'])} tensors; new (not in the checkpoint): "
            f"{_prefixes(report['missing'])}; unused: {_prefixes(report['unused'])}")


def _prefixes(keys: list[str]) -> str:
    # Key lists are long (every layer); name their parts instead.
    parts = sorted({re.sub(r"\.\d+\.", ".*.", k).rsplit(".", 1)[0] for k in keys})
    return ", ".join(parts) if parts else "none"


def _llm_stage(cfg: ExperimentConfig, collate: Callable[..., Any], model: nn.Module, llm_tokenizer: Any,
               report: dict | None, data_kind: str) -> Stage:
    from blip_train.distributed.process_group import print0

    m = cfg.model
    print0(f"init_from {_describe_init(report, m.init_from)}")
    return Stage(model=model, tokenizer=llm_tokenizer, collate=collate, data_kind=data_kind, cfg=cfg,
                 frozen_sources={**frozen_encoder_source(m),
                                 "llm": m.llm.path, "llm_dtype": m.llm.dtype})


def frozen_encoder_source(m) -> dict:
    """The frozen tower's entry of a run's frozen_sources record (`m`: its ModelConfig): what interop tools
    rebuild it from."""
    if m.modality == "audio":
        return {"audio": m.audio.encoder}
    if m.modality == "3d":
        return {"3d": m.points.encoder}
    return {"vision": m.vision.weights or "random-init"}


def build_question_collator(cfg: ExperimentConfig, model: nn.Module, llm_tokenizer: Any, qformer_tokenizer: Any,
                            template: str, generation: bool = False):
    """The collator of BLIP-2 VQA (question-aware stage 2): InstructBLIP's, with the one question `template`
    filled for the Q-Former (`qformer_tokenizer`; None: none) and the LLM, and the answer as the target,
    ended as stage 2 ends its text ("\n" for OPT)."""
    from blip_train.data.llm_collate import InstructCollator, QuestionCollator
    from blip_train.data.templates import question_templates

    m = cfg.model
    end = END_OF_TEXT.get(model.llm.config.model_type) if model.decoder_only else None
    return QuestionCollator(InstructCollator(
        qformer_tokenizer, llm_tokenizer, templates=question_templates(template), max_prompt_len=m.llm.max_prompt_len,
        max_txt_len=m.llm.max_txt_len, decoder_only=model.decoder_only, max_qformer_len=m.max_txt_len, eos_text=end,
        seed=cfg.run.seed, generation=generation))


def load_stage_qformer_tokenizer(cfg: ExperimentConfig):
    """The Q-Former tokenizer of a model that feeds text to its Q-Former, checked against its vocabulary."""
    from blip_train.data.tokenizers import load_qformer_tokenizer

    m = cfg.model
    if not m.qformer.tokenizer:
        raise ConfigError(f"model.qformer.tokenizer: required for model.arch={m.arch}"
                          f"{' with model.qformer_text_input' if m.arch == 'stage2' else ''} (text enters the "
                          "Q-Former)")
    _require_file("model.qformer.tokenizer", m.qformer.tokenizer)
    qtok = load_qformer_tokenizer(m.qformer.tokenizer)
    if len(qtok) > m.qformer.vocab_size:
        raise ConfigError(f"model.qformer.vocab_size: {m.qformer.vocab_size} is smaller than the tokenizer's "
                          f"{len(qtok)} tokens ({m.qformer.tokenizer})")
    return qtok


def build_stage2(cfg: ExperimentConfig, world: WorldInfo, on_cuda: bool, ds_config: dict | None = None) -> Stage:
    """BLIP-2 stage 2: captions → LM loss through the frozen LLM (decoder-only or FlanT5 prefix LM).
    With model.qformer_text_input (BLIP-2 VQA fine-tuning): questions → answers, the question entering the
    Q-Former through InstructBLIP's instruction path, the template model.llm.prompt."""
    from blip_train.data.llm_collate import DecoderLMCollator, T5PrefixCollator

    if cfg.model.qformer_text_input:
        qtok = load_stage_qformer_tokenizer(cfg)
        model, tok, report = build_llm_stage_model(cfg, "cuda" if on_cuda else "cpu", ds_config)
        collate = build_question_collator(cfg, model, tok, qtok, cfg.model.llm.prompt)
        return _llm_stage(cfg, collate, model, tok, report, "vqa")
    model, tok, report = build_llm_stage_model(cfg, "cuda" if on_cuda else "cpu", ds_config)
    llm = cfg.model.llm
    if model.decoder_only:
        collate = DecoderLMCollator(tok, prompt=llm.prompt, max_txt_len=llm.max_txt_len,
                                    eos_text=END_OF_TEXT.get(model.llm.config.model_type))
    else:
        collate = T5PrefixCollator(tok, max_txt_len=llm.max_txt_len, prompt=llm.prompt, seed=cfg.run.seed)
    return _llm_stage(cfg, collate, model, tok, report, "caption")


def build_instruct(cfg: ExperimentConfig, world: WorldInfo, on_cuda: bool, ds_config: dict | None = None) -> Stage:
    """InstructBLIP: templated instructions (Q-Former and LLM) → answer, loss on the answer only."""
    from blip_train.data.llm_collate import InstructCollator

    m = cfg.model
    qtok = load_stage_qformer_tokenizer(cfg)
    model, tok, report = build_llm_stage_model(cfg, "cuda" if on_cuda else "cpu", ds_config)
    collate = InstructCollator(qtok, tok, max_prompt_len=m.llm.max_prompt_len, max_txt_len=m.llm.max_txt_len,
                               decoder_only=model.decoder_only, max_qformer_len=m.max_txt_len, seed=cfg.run.seed)
    return _llm_stage(cfg, collate, model, tok, report, "instruct")


# ---------------------------------------------------------------------------------------- BLIP / ALBEF

def build_blip_model(cfg: ExperimentConfig, world: WorldInfo | None = None, report: dict | None = None):
    """BlipPretrain (model.arch blip | albef) with its tokenizer: the ViT from model.vision.weights and the text
    transformer from model.text.bert_init when given, then the momentum copies set to the online weights; with
    model.init_from, those weights are then overwritten from it (`training.weights.init_blip_from_`, whose
    report fills `report` when given: what stayed at init, where the momentum copies came from)."""
    from blip_train.data.tokenizers import DEC_TOKEN, ENC_TOKEN, load_blip_tokenizer
    from blip_train.models.blip import BlipPretrain, TextTokens
    from blip_train.models.eva_vit import load_vit_weights
    from blip_train.models.qformer import load_bert_weights

    m = cfg.model
    if not m.text.tokenizer:
        raise ConfigError(f"model.text.tokenizer: required for model.arch={m.arch} (a local BERT tokenizer folder)")
    for key, path in (("model.text.tokenizer", m.text.tokenizer), ("model.vision.weights", m.vision.weights),
                      ("model.text.bert_init", m.text.bert_init), ("model.init_from", m.init_from)):
        _require_file(key, path)
    tokenizer = load_blip_tokenizer(m.text.tokenizer)
    if len(tokenizer) > m.text.vocab_size:
        raise ConfigError(f"model.text.vocab_size: {m.text.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens ({m.text.tokenizer})")
    tokens = TextTokens(pad=tokenizer.pad_token_id, cls=tokenizer.cls_token_id, sep=tokenizer.sep_token_id,
                        mask=tokenizer.mask_token_id, enc=tokenizer.convert_tokens_to_ids(ENC_TOKEN),
                        dec=tokenizer.convert_tokens_to_ids(DEC_TOKEN),
                        vocab_size=len(tokenizer))
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    model = BlipPretrain(m, tokens, world)
    model.prompt_ids = tokenizer(m.text.prompt, add_special_tokens=False)["input_ids"]
    if m.vision.weights:
        load_vit_weights(model.visual_encoder, m.vision.weights)
    if m.text.bert_init:
        load_bert_weights(model.text, m.text.bert_init)
    model.copy_to_momentum_()
    if m.init_from:
        from blip_train.training.weights import init_blip_from_
        result = init_blip_from_(model, m.init_from)  # sets the momentum copies itself (loaded or copied)
        if report is not None:
            report.update(result)
    return model, tokenizer


def build_blip(cfg: ExperimentConfig, world: WorldInfo, on_cuda: bool, ds_config: dict | None = None) -> Stage:
    from blip_train.data.collate import BlipCollator, BlipVQACollator, Stage1Collator

    from blip_train.distributed.process_group import print0

    report: dict = {}
    model, tokenizer = build_blip_model(cfg, world, report)
    if cfg.model.init_from:
        answer_decoder = (f"VQA answer decoder from the MED: {_prefixes(report['answer_decoder'])}; "
                          if report.get("answer_decoder") else "")
        print0(f"init_from {cfg.model.init_from}: loaded; kept initial values for {_prefixes(report['kept'])}; "
               f"decoder self-attention from the encoder's: {_prefixes(report['decoder_from_encoder'])}; "
               f"{answer_decoder}momentum copies {report['momentum']}; queue {report['queue']}")
    m = cfg.model
    if m.objective == "vqa":  # questions with their human answers
        return Stage(model=model, tokenizer=tokenizer, collate=BlipVQACollator(tokenizer, m.max_txt_len, m.max_txt_len),
                     data_kind="vqa", cfg=cfg)
    collate = BlipCollator(tokenizer, m.max_txt_len, prompt=m.text.prompt) if m.arch == "blip" else \
        Stage1Collator(tokenizer, m.max_txt_len)
    return Stage(model=model, tokenizer=tokenizer, collate=collate, data_kind="caption", cfg=cfg)


STAGE_BUILDERS: dict[str, Callable[..., Stage]] = {
    "stage1": build_stage1,
    "stage2": build_stage2,
    "instruct": build_instruct,
    "blip": build_blip,
    "albef": build_blip,
}


def build_stage(cfg: ExperimentConfig, world: WorldInfo, on_cuda: bool, ds_config: dict | None = None) -> Stage:
    """The architecture's Stage; `ds_config` (the run's DeepSpeed config) lets ZeRO-3 build frozen towers
    partitioned."""
    if cfg.model.arch not in STAGE_BUILDERS:
        raise ConfigError(f"model.arch: {cfg.model.arch!r} is not built yet (available: {', '.join(STAGE_BUILDERS)})")
    if not cfg.data.train:
        raise ConfigError("data.train: empty; list at least one MDS stream")
    return STAGE_BUILDERS[cfg.model.arch](cfg, world, on_cuda, ds_config)


def describe_parameters(model: nn.Module) -> str:
    """Trainable and frozen parameter counts per top-level child (what the optimizer will and won't touch)."""
    lines = []
    for name, child in model.named_children():
        tr, fr = count_parameters(child)
        lines.append(f"  {name:<16} trainable {tr:>12,d}  frozen {fr:>12,d}")
    tr, fr = count_parameters(model)
    return "parameters:\n" + "\n".join(lines) + f"\n  {'total':<16} trainable {tr:>12,d}  frozen {fr:>12,d}"
