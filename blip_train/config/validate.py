"""Validation of an `ExperimentConfig`: impossible settings refused before any work, naming the key.

Everything here runs before any process group or model exists (bar `check_queue_fits_world`, which needs the
number of ranks), so a bad setting costs seconds, not a queue slot. Errors are `ConfigError`s with a one-line
message that names the key and what is allowed.
"""
from __future__ import annotations

from pathlib import Path

from .loading import ConfigError, parse_cache_limit
from .schema import OBJECTIVES, ExperimentConfig

def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


EVAL_TASK_ARCHS = {"retrieval": ("stage1", "blip", "albef"), "caption": ("stage2", "instruct", "blip"),
                   "vqa": ("stage2", "instruct", "blip")}
"""Which model.arch can run each evaluation task (retrieval needs the ITC/ITM heads; captions an LLM or BLIP's
decoder; VQA an LLM (stage 2 answers questions zero-shot, or question-aware after VQA fine-tuning) or BLIP's
VQA model (model.objective=vqa)).
"""
NO_MOMENTUM_OBJECTIVES = ("caption", "vqa")
"""BLIP objectives without a contrastive loss, so without momentum encoders and queue."""
BLIP_OBJECTIVE_TASKS = {"pretrain": ("retrieval", "caption"), "retrieval": ("retrieval",), "caption": ("caption",),
                        "vqa": ("vqa",)}
"""The evaluation tasks a model.arch=blip run can do: a fine-tuning objective trains the parts of its own task only
(the others stay frozen at model.init_from)."""
_BLIP_TASK_PARTS = {"retrieval": "the ITC / ITM heads", "caption": "the caption decoder",
                    "vqa": "a VQA answer decoder (model.objective=vqa)"}


def blip_task_refusal(objective: str, task: str) -> str:
    """Why a model.arch=blip run of `objective` cannot be evaluated on `task` ('' when it can)."""
    can = BLIP_OBJECTIVE_TASKS.get(objective, ())
    if task in can:
        return ""
    return (f"a model.objective={objective} run does not train {_BLIP_TASK_PARTS[task]}: use "
            f"{' or '.join('--task ' + t for t in can)}")
_DEFAULT_EVAL_TASK = {"stage1": "retrieval", "stage2": "caption", "instruct": "vqa", "blip": "retrieval",
                      "albef": "retrieval"}


def eval_task(cfg: ExperimentConfig) -> str:
    """The in-training evaluation task: eval.task, or the architecture's own when 'auto'."""
    if cfg.eval.task != "auto":
        return cfg.eval.task
    if cfg.model.arch == "blip" and cfg.model.objective in ("caption", "vqa"):
        return cfg.model.objective
    return "vqa" if cfg.model.arch == "stage2" and cfg.model.qformer_text_input else _DEFAULT_EVAL_TASK[cfg.model.arch]


def _check_momentum(cfg: ExperimentConfig) -> None:
    """BLIP / ALBEF: a training ViT, a sane EMA, and a queue the global batch fills in whole steps."""
    m, mom = cfg.model, cfg.model.momentum
    if m.vision.frozen:
        raise ConfigError(f"model.vision.frozen: model.arch={m.arch} trains its ViT end to end; set it false")
    if m.objective in NO_MOMENTUM_OBJECTIVES:
        return
    if not 0 <= mom.decay < 1:
        raise ConfigError(f"model.momentum.decay: must be in [0, 1), got {mom.decay}")
    if not 0 <= mom.alpha <= 1:
        raise ConfigError(f"model.momentum.alpha: must be in [0, 1], got {mom.alpha}")
    _positive("model.momentum.alpha_ramp_steps", mom.alpha_ramp_steps, allow_zero=True)
    if cfg.deepspeed.offload_frozen:
        raise ConfigError(f"deepspeed.offload_frozen: model.arch={m.arch} has no frozen tower to offload; its frozen "
                          "parameters are the momentum encoders, which every step updates on the device")
    _positive("model.momentum.queue_size", mom.queue_size)
    t = cfg.train
    # The queue takes the whole global micro-batch (every rank's samples) per forward: it must divide the queue.
    # The number of ranks is known only at launch; the model checks that part (FeatureQueue.enqueue_).
    if mom.queue_size % t.micro_batch_size:
        raise ConfigError(f"model.momentum.queue_size: {mom.queue_size} is not a multiple of train.micro_batch_size="
                          f"{t.micro_batch_size} (each forward enqueues micro_batch_size x ranks features)")


def check_queue_fits_world(cfg: ExperimentConfig, world_size: int) -> None:
    """BLIP / ALBEF: every training forward enqueues micro_batch_size x world_size momentum features, so that
    number must divide model.momentum.queue_size (checked once the number of ranks is known, before any work)."""
    if cfg.model.arch not in ("blip", "albef") or cfg.model.objective in NO_MOMENTUM_OBJECTIVES:
        return
    per_forward = cfg.train.micro_batch_size * world_size
    if cfg.model.momentum.queue_size % per_forward:
        raise ConfigError(f"model.momentum.queue_size: {cfg.model.momentum.queue_size} is not a multiple of the "
                          f"{per_forward} features each forward enqueues (train.micro_batch_size="
                          f"{cfg.train.micro_batch_size} x {world_size} ranks)")


def validate_config(cfg: ExperimentConfig) -> None:
    """Refuse impossible settings, naming the key to change. Runs before any distributed set-up."""
    r, m, d, o, t, ds = cfg.run, cfg.model, cfg.data, cfg.optim, cfg.train, cfg.deepspeed
    _choice("run.device", r.device, ("auto", "cpu", "cuda"))
    _choice("model.arch", m.arch, ("stage1", "stage2", "instruct", "blip", "albef"))
    _choice("model.attention", m.attention, ("auto", "flash", "sdpa", "math"))
    _choice("model.vision.precision", m.vision.precision, ("fp16", "bf16", "fp32"))
    _choice("model.llm.dtype", m.llm.dtype, ("fp16", "bf16", "fp32"))
    _choice("data.balance", d.balance, ("size", "sqrt", "uniform"))
    _choice("optim.fused", o.fused, ("auto", "on", "off"))
    _choice("optim.schedule", o.schedule, ("cosine", "step"))
    if o.schedule == "step":
        _positive("optim.decay_steps", o.decay_steps)
        if not 0 < o.decay_rate <= 1:
            raise ConfigError(f"optim.decay_rate: must be in (0, 1], got {o.decay_rate}")
    _choice("deepspeed.precision", ds.precision, ("bf16", "fp16", "fp32"))
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: {ds.zero_stage} is not one of 0, 1, 2, 3")
    for key, val in [("model.qformer.num_query_tokens", m.qformer.num_query_tokens),
                     ("model.qformer.layers", m.qformer.layers), ("model.qformer.heads", m.qformer.heads),
                     ("model.qformer.cross_attention_freq", m.qformer.cross_attention_freq),
                     ("model.vision.heads", m.vision.heads), ("model.vision.patch_size", m.vision.patch_size),
                     ("model.embed_dim", m.embed_dim), ("model.max_txt_len", m.max_txt_len),
                     ("train.max_steps", t.max_steps), ("train.micro_batch_size", t.micro_batch_size),
                     ("train.grad_accum_steps", t.grad_accum_steps), ("train.log_interval", t.log_interval),
                     ("train.save_interval", t.save_interval), ("train.keep_last", t.keep_last),
                     ("train.max_bad_steps", t.max_bad_steps), ("data.image_size", d.image_size),
                     ("data.num_canonical_nodes", d.num_canonical_nodes),
                     ("eval.num_beams", cfg.eval.num_beams), ("eval.max_new_tokens", cfg.eval.max_new_tokens),
                     ("eval.vqa_max_new_tokens", cfg.eval.vqa_max_new_tokens), ("optim.lr", o.lr)]:
        _positive(key, val)
    for key, val in [("optim.min_lr", o.min_lr), ("optim.warmup_steps", o.warmup_steps),
                     ("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip),
                     ("eval.interval", cfg.eval.interval), ("eval.min_new_tokens", cfg.eval.min_new_tokens),
                     ("train.keep_every", t.keep_every)]:
        _positive(key, val, allow_zero=True)
    if m.qformer.hidden_size % m.qformer.heads:
        raise ConfigError(f"model.qformer.hidden_size: {m.qformer.hidden_size} is not divisible by model.qformer.heads={m.qformer.heads}")
    if m.vision.width % m.vision.heads:
        raise ConfigError(f"model.vision.width: {m.vision.width} is not divisible by model.vision.heads={m.vision.heads}")
    if m.vision.image_size % m.vision.patch_size:
        raise ConfigError(f"model.vision.image_size: {m.vision.image_size} is not a multiple of model.vision.patch_size={m.vision.patch_size}")
    if d.image_size != m.vision.image_size:
        raise ConfigError(f"data.image_size: {d.image_size} differs from model.vision.image_size={m.vision.image_size}")
    if not 0 < d.crop_scale_min <= 1:
        raise ConfigError(f"data.crop_scale_min: must be in (0, 1], got {d.crop_scale_min}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {o.betas}")
    if cfg.eval.min_new_tokens > cfg.eval.max_new_tokens:
        raise ConfigError(f"eval.min_new_tokens: {cfg.eval.min_new_tokens} exceeds eval.max_new_tokens="
                          f"{cfg.eval.max_new_tokens}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr: {o.min_lr} exceeds optim.lr={o.lr}")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay: must be in (0, 1] (1: off), got {o.layer_decay}")
    if o.layer_decay != 1 and m.vision.frozen:
        raise ConfigError(f"optim.layer_decay: {o.layer_decay} decays the lr of a training ViT, but "
                          "model.vision.frozen is true; set model.vision.frozen=false or optim.layer_decay=1")
    if not 0 <= m.vision.drop_path_rate < 1:
        raise ConfigError(f"model.vision.drop_path_rate: must be in [0, 1), got {m.vision.drop_path_rate}")
    if m.vision.drop_path_rate and m.vision.frozen:
        raise ConfigError(f"model.vision.drop_path_rate: {m.vision.drop_path_rate} needs a training ViT (a frozen "
                          "one runs in eval mode); set model.vision.frozen=false or model.vision.drop_path_rate=0")
    if m.objective not in OBJECTIVES.get(m.arch, ("pretrain",)):
        raise ConfigError(f"model.objective: {m.objective!r} is not one of "
                          f"{', '.join(OBJECTIVES.get(m.arch, ('pretrain',)))} for model.arch={m.arch}")
    if m.text.prompt and m.objective != "caption":
        raise ConfigError(f"model.text.prompt: {m.text.prompt!r} is read by BLIP's captioning objective only; set "
                          "model.objective=caption (model.arch=blip) or leave the prompt empty")
    if m.arch in ("blip", "albef"):
        _check_momentum(cfg)
    _positive("model.video_frames", m.video_frames, allow_zero=True)
    if m.video_frames and m.arch not in ("stage2", "instruct"):
        raise ConfigError(f"model.video_frames: video feeds an LLM through the Q-Former (model.arch stage2 | "
                          f"instruct); this run is model.arch={m.arch}")
    if m.video_frames and d.decode == "gpu":
        raise ConfigError("data.decode: gpu decodes one JPEG per sample; video samples (model.video_frames) are "
                          "decoded on the CPU (data.decode=cpu)")
    _check_modality(cfg)
    if cfg.eval.answer_list and (m.arch, m.objective) != ("blip", "vqa"):
        raise ConfigError(f"eval.answer_list: ranks candidate answers with BLIP's VQA decoder (model.arch=blip, "
                          f"model.objective=vqa); this run is model.arch={m.arch}, model.objective={m.objective}")
    lora = m.llm.lora
    _positive("model.llm.lora.r", lora.r, allow_zero=True)
    if lora.r:
        if m.arch == "stage1":
            raise ConfigError("model.llm.lora.r: stage 1 has no LLM to adapt; set model.llm.lora.r=0")
        _positive("model.llm.lora.alpha", lora.alpha)
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"model.llm.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if m.arch in ("stage2", "instruct") and not m.llm.path:
        raise ConfigError(f"model.llm.path: required for model.arch={m.arch} (a local HF model folder)")
    if m.qformer_text_input and m.arch != "instruct":
        if m.arch != "stage2":
            raise ConfigError(f"model.qformer_text_input: needs model.arch=stage2 (instruct always feeds its "
                              f"instruction to the Q-Former), this run is model.arch={m.arch}")
        if m.llm.prompt.count("{}") != 1:
            raise ConfigError(f"model.llm.prompt: {m.llm.prompt!r} must hold one '{{}}' for the question with "
                              "model.qformer_text_input (e.g. 'Question: {} Answer:')")
    if cfg.eval.vqa_prompt and cfg.eval.vqa_prompt.count("{}") != 1:
        raise ConfigError(f"eval.vqa_prompt: {cfg.eval.vqa_prompt!r} must hold one '{{}}' for the question "
                          "(e.g. 'Question: {} Answer:'), or be empty")
    for i, s in enumerate(d.train):
        if not (s.local or s.remote):
            raise ConfigError(f"data.train[{i}]: needs local (an MDS directory) or remote")
        _positive(f"data.train[{i}].proportion", s.proportion, allow_zero=True)
        if d.cache_limit and not s.remote:
            raise ConfigError(f"data.cache_limit: data.train[{i}] ({s.local}) is not remote, and streaming would "
                              "evict (delete) its shards to stay under the limit; limit only all-remote mixtures")
    parse_cache_limit(d.cache_limit)
    if isinstance(d.num_workers, str) and d.num_workers != "auto":
        raise ConfigError(f"data.num_workers: expected a number of workers or auto, got {d.num_workers!r}")
    if isinstance(d.num_workers, int):
        _positive("data.num_workers", d.num_workers, allow_zero=True)
    _choice("data.decode", d.decode, ("cpu", "gpu"))
    on_cuda = r.device == "cuda" or (r.device == "auto" and cuda_available())
    if r.device == "cuda" and not cuda_available():
        raise ConfigError("run.device: 'cuda' requested but no CUDA device is available")
    if not on_cuda:
        if ds.precision == "fp16":
            raise ConfigError("deepspeed.precision: fp16 needs a CUDA device (this run is on CPU; use bf16 or fp32)")
        if m.llm.dtype == "fp16" and m.arch != "stage1":
            raise ConfigError("model.llm.dtype: fp16 needs a CUDA device (this run is on CPU; use bf16 or fp32)")
        if m.attention == "flash":
            raise ConfigError("model.attention: flash needs a CUDA device (this run is on CPU; use auto or sdpa)")
        if d.decode == "gpu":
            raise ConfigError("data.decode: gpu needs a CUDA device (this run is on CPU; use data.decode=cpu)")
    if cfg.eval.interval and not d.val:
        raise ConfigError("eval.interval: in-training evaluation needs data.val (a held-out MDS split)")
    _choice("eval.task", cfg.eval.task, ("auto",) + tuple(EVAL_TASK_ARCHS))
    if cfg.eval.task != "auto" and m.arch not in EVAL_TASK_ARCHS[cfg.eval.task]:
        raise ConfigError(f"eval.task: {cfg.eval.task} needs model.arch in {', '.join(EVAL_TASK_ARCHS[cfg.eval.task])}, "
                          f"this run is model.arch={m.arch}")
    if m.arch == "blip" and blip_task_refusal(m.objective, eval_task(cfg)):
        raise ConfigError(f"eval.task: {eval_task(cfg)}: {blip_task_refusal(m.objective, eval_task(cfg))}")
    if m.arch == "stage2" and m.qformer_text_input and eval_task(cfg) == "caption":
        raise ConfigError("eval.task: caption needs a captioning model; this one is fine-tuned to answer questions "
                          "(model.qformer_text_input): use eval.task=vqa (or auto) with a VQA data.val")
    if r.wandb:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("run.wandb: the wandb package is not installed (pip install -e '.[wandb]'), or set "
                              "run.wandb=false")
    if ds.offload_frozen and ds.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_frozen: needs deepspeed.zero_stage=3, got {ds.zero_stage}")
    _choice("deepspeed.offload_device", ds.offload_device, ("cpu", "nvme"))
    if ds.offload_device == "nvme":
        if ds.zero_stage != 3:
            raise ConfigError(f"deepspeed.offload_device: nvme needs deepspeed.zero_stage=3, got {ds.zero_stage}")
        if not ds.nvme_path:
            raise ConfigError("deepspeed.nvme_path: required for deepspeed.offload_device=nvme (a directory on a "
                              "node-local NVMe drive)")


ENCODER_MODALITIES = {"audio": ("model.audio.encoder", "a local HF folder of an ASTModel"),
                      "3d": ("model.points.encoder", "a local Point-BERT folder: tools/import_ulip2_pointbert.py")}
"""model.modality → (key, what) of the frozen encoder that takes the ViT's place."""


def _check_modality(cfg: ExperimentConfig) -> None:
    m = cfg.model
    if m.modality not in ("image", *ENCODER_MODALITIES):
        raise ConfigError(f"model.modality: must be image, audio or 3d, got {m.modality!r}")
    if m.modality_prefix and m.arch not in ("stage2", "instruct"):
        raise ConfigError(f"model.modality_prefix: is text for an LLM (model.arch stage2 | instruct); this run is "
                          f"model.arch={m.arch}")
    if m.modality == "image":
        return
    if m.arch not in ("stage2", "instruct"):
        raise ConfigError(f"model.modality: {m.modality} feeds an LLM through the Q-Former (model.arch stage2 | "
                          f"instruct); this run is model.arch={m.arch}")
    key, what = ENCODER_MODALITIES[m.modality]
    if not (m.audio.encoder if m.modality == "audio" else m.points.encoder):
        raise ConfigError(f"{key}: required for model.modality={m.modality} ({what})")
    if m.video_frames:
        raise ConfigError(f"model.video_frames: {m.video_frames} frames of video, but model.modality={m.modality}")
    if m.modality == "audio":
        _positive("model.audio.segments", m.audio.segments)
    else:
        _positive("model.points.num_points", m.points.num_points)
    if cfg.data.decode == "gpu":
        raise ConfigError(f"data.decode: gpu decodes JPEGs; {m.modality} samples are read on the CPU (data.decode=cpu)")


def input_paths(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(key, path) of every local input this run will read: weights, tokenizers, the LLM, data."""
    m, d = cfg.model, cfg.data
    paths = [("model.vision.weights", m.vision.weights), ("model.qformer.tokenizer", m.qformer.tokenizer),
             ("model.qformer.bert_init", m.qformer.bert_init), ("model.init_from", m.init_from)]
    if m.arch in ("stage2", "instruct"):
        paths.append(("model.llm.path", m.llm.path))
    if m.modality == "audio":
        paths.append(("model.audio.encoder", m.audio.encoder))
    if m.modality == "3d":
        paths.append(("model.points.encoder", m.points.encoder))
    if m.arch in ("blip", "albef"):
        paths += [("model.text.tokenizer", m.text.tokenizer), ("model.text.bert_init", m.text.bert_init)]
    paths += [(f"data.train[{i}].local", s.local) for i, s in enumerate(d.train) if s.local and not s.remote]
    if cfg.eval.interval:
        paths += [("data.val", d.val), ("eval.answer_list", cfg.eval.answer_list)]
    return [(k, p) for k, p in paths if p]


def check_input_paths(cfg: ExperimentConfig) -> None:
    """Refuse a config whose input files or folders do not exist, naming the key (seconds after start,
    not minutes into model building)."""
    for key, path in input_paths(cfg):
        if not Path(path).exists():
            raise ConfigError(f"{key}: {path} does not exist")


def config_warnings(cfg: ExperimentConfig) -> list[str]:
    """Settings that run but are almost certainly not what a real experiment wants."""
    out = []
    if not cfg.model.vision.weights and cfg.model.vision.frozen and cfg.model.modality == "image":
        out.append("warning: model.vision.weights is empty: the frozen ViT is randomly initialised, which is for "
                   "tests only (import real weights, e.g. tools/import_lavis.py --eva eva_vit_g.pth)")
    return out
