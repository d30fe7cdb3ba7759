"""Our checkpoint -> a transformers folder (`from_pretrained(DIR)` + `generate` work, no missing keys).

Sources of the exported weights, by part:
- trained parts (ln_vision, Q-Former, query tokens, projections, ITM head): the checkpoint, consolidated
  from its ZeRO shards (fp32 master weights), or a weights folder / .safetensors of ours;
- frozen ViT: `model.vision.weights` (the run's source; loaded as training loads it: dropped last
  block, interpolated position embeddings), else frozen tensors in the weights (--include-frozen);
- frozen LLM, its config and tokenizer: `model.llm.path`, the run's HF folder;
- LoRA adapters of the LLM (model.llm.lora), trained: merged into the exported LLM's weights
  (W + alpha/r * B @ A, in fp32), or with `lora_adapter` written as a peft adapter folder
  `<out>/lora_adapter` next to the untouched base weights; load it with
  `model.language_model.load_adapter(f"{out}/lora_adapter")` (transformers) or
  `peft.PeftModel.from_pretrained(model.language_model, f"{out}/lora_adapter")`.
BLIP runs (model.arch=blip) export through hf_export_blip.py. Left out on purpose: the ITC temperature `temp` and the Q-Former LM head (no transformers class has
them). transformers places the soft prompt at `<image>` placeholder tokens, so the exported LLM
tokenizer gains `<image>`; when its id falls outside the LLM's embedding matrix, zero rows are
appended (the placeholder's embedding is never read: the soft prompt replaces it) and generation
suppresses it, so outputs over the original vocabulary are unchanged. The decoding defaults are
written twice: generation_config.json (the outer model's) and text_config, because the outer
`generate` runs `language_model.generate`, whose generation config transformers builds from text_config.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from blip_train.config import ConfigError, ExperimentConfig, config_from_dict
from blip_train.interop.hf_config import (BLIP_DEFAULT_CLASS, LAYOUTS, assign_into, build_processor,
                                          carry_generation_defaults_, generation_config_for, hf_class, hf_config_for)
from blip_train.interop.weights_io import (InteropError, check_output, is_weights_file, is_weights_folder,
                                           parse_dtype, parse_size, read_weights, replacing)
from blip_train.models.hf_names import model_to_hf
from blip_train.models.lora import LORA_KEY, is_lora_key, merge_lora_, peft_adapter_state

EXPORT_INFO = "blip_train_export.json"
LORA_ADAPTER_DIR = "lora_adapter"
NOT_EXPORTED = {"stage1": (r"temp", r"qformer\.lm_head\."), "stage2": (), "instruct": ()}
"""Our trained keys that the arch's transformers class has no place for (regex prefixes)."""


@dataclass
class ExportSource:
    cfg: ExperimentConfig
    weights: dict[str, torch.Tensor]
    """Our names: the trained parts, possibly frozen towers too."""
    meta: dict


REPO = Path(__file__).resolve().parents[2]


def _resolve_paths(data: dict, base: Path, only_missing: bool = False) -> dict:
    """Relative asset paths of a config -> paths under `base`.

    Weights folders written by import_hf name their assets relative to themselves (all resolved);
    a run's config names them relative to where training ran, usually the checkout (`make demo`):
    those are kept when they exist from here, else looked up under `base`."""
    m = data.setdefault("model", {})
    for section, key in (("vision", "weights"), ("qformer", "tokenizer"), ("qformer", "bert_init"), ("llm", "path"),
                         ("text", "tokenizer"), ("text", "bert_init")):
        value = m.get(section, {}).get(key)
        if not value or Path(value).is_absolute() or (only_missing and Path(value).exists()):
            continue
        if not only_missing or (base / value).exists():
            m[section][key] = str(base / value)
    return data


def _read_config_file(path_or_recipe: str) -> dict:
    import yaml

    from blip_train.config.loading import resolve_recipe

    try:
        data = yaml.safe_load(resolve_recipe(path_or_recipe).read_text())
    except (ConfigError, OSError, yaml.YAMLError) as e:
        raise InteropError(f"--config {path_or_recipe}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InteropError(f"--config {path_or_recipe}: expected a mapping at top level")
    return data


def load_export_source(path: Union[str, Path], tag: Optional[str] = None, config: Optional[str] = None,
                       overrides: Sequence[str] = ()) -> ExportSource:
    """A run / checkpoint (trained weights consolidated here) or a weights folder / file, and the config
    that rebuilds its model: `config` (a YAML / recipe) if given, else the one the source carries (the
    run's config.yaml, or the weights' metadata); `overrides` ("key=value") apply on top."""
    from blip_train.config.loading import _set_dotted
    from blip_train.interop.consolidate import consolidate_checkpoint

    p = Path(path)
    if is_weights_folder(p) or is_weights_file(p):
        if tag is not None:
            raise InteropError(f"--tag applies to ZeRO checkpoints; {p} is a weights file/folder")
        weights, meta = read_weights(p)
        data = json.loads(json.dumps(meta.get("config") or {}))
        if meta.get("paths_relative_to_folder"):
            data = _resolve_paths(data, p if p.is_dir() else p.parent)
    else:
        c = consolidate_checkpoint(p, tag)
        weights = {k: v.contiguous() for k, v in c.tensors.items()}
        meta, data = c.meta, c.config or {}
    if config:
        data = _read_config_file(config)
    if not data:
        raise InteropError(f"{p}: carries no config (a run needs config.yaml next to checkpoints/; LAVIS imports "
                           "have none): pass --config")
    data = _resolve_paths(data, REPO, only_missing=True)  # a run's paths: relative to where it ran
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep:
            raise InteropError(f"--set {ov!r}: expected KEY=VALUE")
        try:
            _set_dotted(data, key.strip(), value)
        except ConfigError as e:
            raise InteropError(str(e)) from None
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise InteropError(f"{p}: its config is not valid here ({e})") from None
    return ExportSource(cfg=cfg, weights=weights, meta=meta)


# ------------------------------------------------------------------------------------------ assembly

def _llm_class(llm_config: Any) -> type:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    return AutoModelForSeq2SeqLM if llm_config.is_encoder_decoder else AutoModelForCausalLM


def expected_trained(cfg: ExperimentConfig, llm_config: Any = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's trainable parameters (built on the meta device: no memory)."""
    from blip_train.models.llm_bridge import Blip2LLM
    from blip_train.models.stage1 import Blip2Stage1

    with torch.device("meta"):
        if cfg.model.arch == "stage1":
            model = Blip2Stage1(cfg.model, device_type="cpu")
        else:
            model = Blip2LLM(cfg.model, _llm_class(llm_config).from_config(llm_config), device_type="cpu")
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _check_trained(weights: dict, expected: dict, arch: str, where: str) -> dict[str, torch.Tensor]:
    optional = NOT_EXPORTED[arch]
    missing = [k for k in expected if k not in weights and not any(re.match(p, k) for p in optional)]
    frozen_roots = ("visual_encoder.", "llm.")
    unexpected = [k for k in weights if k not in expected and not k.startswith(frozen_roots)]
    if missing or unexpected:
        raise InteropError(f"{where}: weights do not match a model.arch={arch} model of this config: missing "
                           f"{missing[:4]}, unexpected {unexpected[:4]}")
    for k in expected:
        if k in weights and tuple(weights[k].shape) != expected[k]:
            raise InteropError(f"{where}: {k} has shape {tuple(weights[k].shape)}, the config's model expects "
                               f"{expected[k]} (model.vision / model.qformer sizes differ from the weights?)")
    return {k: weights[k] for k in expected if k in weights}


def frozen_vision_state(cfg: ExperimentConfig, weights: dict) -> dict[str, torch.Tensor]:
    """The frozen ViT's weights (EVAViT names), exactly as training loads them from model.vision.weights."""
    from blip_train.models.eva_vit import EVAViT, load_vit_weights

    v = cfg.model.vision
    if v.weights:
        if not Path(v.weights).is_file():
            raise InteropError(f"model.vision.weights: {v.weights} does not exist (the frozen ViT's source)")
        with torch.device("meta"):
            vit = EVAViT(replace(v, precision="fp32"), attention="math")
        vit.to_empty(device="cpu")  # no random init for a tower about to be overwritten
        try:
            load_vit_weights(vit, v.weights)
        except ValueError as e:
            raise InteropError(f"model.vision.weights: {str(e).splitlines()[0][:300]}") from None
        return {k: t.detach() for k, t in vit.state_dict().items()}
    held = {k[len("visual_encoder."):]: t for k, t in weights.items() if k.startswith("visual_encoder.")}
    if not held:
        raise InteropError("model.vision.weights is empty and the weights hold no frozen ViT (consolidate with "
                           "--include-frozen, or set model.vision.weights)")
    return held


def fit_vocab_(llm_sd: dict[str, torch.Tensor], llm_config: Any, size: int) -> list[str]:
    """Append zero rows to the LLM's input/output embeddings (and tied aliases) up to `size` rows."""
    with torch.device("meta"):
        skeleton = _llm_class(llm_config).from_config(llm_config)
    targets = {id(skeleton.get_input_embeddings()), id(skeleton.get_output_embeddings())}
    names = [n for n, mod in skeleton.named_modules(remove_duplicate=False) if id(mod) in targets]
    padded = []
    for name in names:
        for key in (f"{name}.weight", f"{name}.bias"):
            t = llm_sd.get(key)
            if t is not None and t.shape[0] < size:
                extra = t.new_zeros((size - t.shape[0],) + tuple(t.shape[1:]))
                llm_sd[key] = torch.cat([t, extra])  # (V', ...) the new rows are never read or produced
                padded.append(key)
    llm_config.vocab_size = size
    return padded


def load_frozen_llm(path: str, dtype: torch.dtype):
    from transformers import AutoConfig

    if not path or not Path(path).is_dir():
        raise InteropError(f"model.llm.path: {path or '(empty)'} is not a local HF folder (the frozen LLM's source)")
    llm_config = AutoConfig.from_pretrained(path, local_files_only=True)
    llm = _llm_class(llm_config).from_pretrained(path, dtype=dtype, local_files_only=True)
    return llm_config, {k: t.detach() for k, t in llm.state_dict().items()}


def write_lora_adapter(folder: Path, lora: dict[str, torch.Tensor], cfg: Any, llm_config: Any,
                       dtype: torch.dtype) -> None:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) for the exported LLM:
    `lora` is named relative to the LLM (`<module>.lora_A.default.weight`); target_modules are written
    out as resolved (the module names that carry adapters), so loading needs no per-architecture table."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    targets = sorted({LORA_KEY.match(k).group("module").rsplit(".", 1)[-1] for k in lora})
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", task_type="SEQ_2_SEQ_LM" if llm_config.is_encoder_decoder else "CAUSAL_LM")
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    save_file({k: v.to(dtype).contiguous() for k, v in peft_adapter_state(lora).items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


# -------------------------------------------------------------------------------------------- export

def export_hf(source: Union[str, Path], out: Union[str, Path], *, tag: Optional[str] = None, dtype: str = "fp32",
              overwrite: bool = False, max_shard_size: str = "5GB", config: Optional[str] = None,
              overrides: Sequence[str] = (), lora_adapter: bool = False, hf_class_name: Optional[str] = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Write the transformers folder for `source` (run dir / checkpoint / weights folder or file) to `out`;
    `config` / `overrides` as in `load_export_source`. LoRA adapters are merged into the LLM, or with
    `lora_adapter` written as a peft adapter folder `out/lora_adapter` (the LLM keeps its base weights).
    `hf_class_name`: the transformers class; BLIP-2 archs have one each (given, it must be that one),
    model.arch=blip has three (see `export_blip_hf`; default BlipForImageTextRetrieval).

    Returns a summary: arch, class, image_token_index, tensors written, keys left out, vocab padding.
    """
    from blip_train.data.llm_collate import load_llm_tokenizer
    from blip_train.data.tokenizers import load_qformer_tokenizer

    out = Path(out)
    check_output(out, overwrite)
    target = parse_dtype(dtype)
    parse_size(max_shard_size)  # fail before the (long) loading
    from blip_train.interop.hf_export_blip import (BLIP_ARCHS, BLIP_OBJECTIVE_CLASSES, check_blip_objective_class,
                                                   export_blip_hf, recorded_model)

    if config is None and not overrides:  # refusals the recorded config decides, before merging any shard
        recorded = recorded_model(source, tag)
        if hf_class_name is not None:
            check_blip_objective_class(recorded, hf_class_name, str(source))
        _refuse_video(recorded.get("video_frames", 0), source)
        _refuse_modality(recorded.get("modality", "image"), source)
    src = load_export_source(source, tag, config, overrides)
    cfg, arch = src.cfg, src.cfg.model.arch
    if arch in BLIP_ARCHS:
        # Without --hf-class a fine-tuning run exports to the class of what it trained, a pretraining run to
        # retrieval (the class that holds the most of it).
        default = BLIP_OBJECTIVE_CLASSES.get(cfg.model.objective, (BLIP_DEFAULT_CLASS,))[0]
        return export_blip_hf(src, out, str(source), hf_class_name or default, target, max_shard_size, log)
    _refuse_video(cfg.model.video_frames, source)
    _refuse_modality(cfg.model.modality, source)
    if arch not in LAYOUTS:
        raise InteropError(f"{source}: model.arch={arch!r} cannot be exported (one of {', '.join(LAYOUTS)}, blip)")
    if hf_class_name is not None and hf_class_name != hf_class(arch).__name__:
        raise InteropError(f"--hf-class {hf_class_name}: model.arch={arch} exports to {hf_class(arch).__name__} only")
    m = cfg.model
    if arch == "stage2" and m.qformer_text_input:
        # Blip2ForConditionalGeneration feeds no text to its Q-Former; a question-aware stage 2 has no HF class.
        raise InteropError(f"{source}: model.qformer_text_input=true (question-aware BLIP-2 VQA) has no transformers "
                           "class to export to; evaluate it with python -m blip_train.eval --task vqa")
    log(f"source: model.arch={arch}, {len(src.weights)} tensors")

    llm_config = llm_tokenizer = qformer_tokenizer = None
    full: dict[str, torch.Tensor] = {}
    if arch != "stage1":
        log(f"frozen LLM: {m.llm.path}")
        llm_config, llm_sd = load_frozen_llm(m.llm.path, target)
        llm_tokenizer = load_llm_tokenizer(m.llm.path)
        if llm_config.is_encoder_decoder is False:
            llm_tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    if arch != "stage2":
        if not m.qformer.tokenizer or not Path(m.qformer.tokenizer).is_dir():
            raise InteropError(f"model.qformer.tokenizer: {m.qformer.tokenizer or '(empty)'} is not a tokenizer "
                               "folder (the exported processor needs it)")
        qformer_tokenizer = load_qformer_tokenizer(m.qformer.tokenizer)

    expected = expected_trained(cfg, llm_config)
    full.update(_check_trained(src.weights, expected, arch, str(source)))
    lora = {k[len("llm."):]: full.pop(k) for k in list(full) if k.startswith("llm.") and is_lora_key(k)}
    if lora_adapter and not lora:
        raise InteropError(f"{source}: --lora-adapter, but the model has no LoRA adapters (model.llm.lora.r is 0)")
    if not any(k.startswith("visual_encoder.") for k in expected):  # else the ViT trained: it is in `full`
        log(f"frozen ViT: {m.vision.weights or 'from the weights'}")
        full.update({"visual_encoder." + k: t for k, t in frozen_vision_state(cfg, src.weights).items()})

    processor = build_processor(arch, m.vision.image_size, m.qformer.num_query_tokens, llm_tokenizer,
                                qformer_tokenizer)
    image_token_index, padded = None, []
    if arch != "stage1":
        image_token_index = int(llm_tokenizer.convert_tokens_to_ids("<image>"))
        if lora and not lora_adapter:
            log(f"merging {len(lora) // 2} LoRA adapters into the LLM")
            merge_lora_(llm_sd, lora, m.llm.lora)
        if image_token_index >= llm_config.vocab_size:
            padded = fit_vocab_(llm_sd, llm_config, image_token_index + 1)
        full.update({"llm." + k: t for k, t in llm_sd.items()})

    hf_sd, left_out = model_to_hf(full, LAYOUTS[arch])
    bad = [k for k in left_out if not any(re.match(p, k) for p in NOT_EXPORTED[arch])]
    if bad:
        raise InteropError(f"{source}: keys with no place in {hf_class(arch).__name__}: {bad[:4]}")
    hf_sd = {k: (t.to(target) if t.is_floating_point() else t) for k, t in hf_sd.items()}
    hf_cfg = hf_config_for(m, llm_config, image_token_index)
    hf_cfg.dtype = target
    gen = None
    if arch != "stage1":
        gen = generation_config_for(arch, llm_config, llm_tokenizer, cfg.eval.num_beams, cfg.eval.max_new_tokens,
                                    suppress=[image_token_index] if padded else None)
        # generate() decodes with the language model's generation config, which transformers rebuilds
        # from text_config on loading: the defaults must be there too, not only in generation_config.json.
        carry_generation_defaults_(hf_cfg.text_config, gen)

    with torch.device("meta"):
        model = hf_class(arch)(hf_cfg)
    result = assign_into(model, hf_sd, hf_class(arch).__name__)
    if result.missing_keys or result.unexpected_keys:
        raise InteropError(f"{hf_class(arch).__name__} state mismatch: missing {result.missing_keys[:4]}, "
                           f"unexpected {result.unexpected_keys[:4]}")
    if gen is not None:
        model.generation_config = gen

    summary = {"arch": arch, "class": hf_class(arch).__name__, "dtype": dtype,
               "lora": None if not lora else (LORA_ADAPTER_DIR if lora_adapter else "merged"),
               "image_token_index": image_token_index, "vocab_padded": padded, "left_out": sorted(left_out),
               "tensors": len(hf_sd), "source": src.meta.get("source", {"path": str(source)})}
    def write_adapter(tmp: Path) -> None:
        write_lora_adapter(tmp / LORA_ADAPTER_DIR, lora, m.llm.lora, llm_config, target)

    write_hf_folder(out, model, processor, summary, max_shard_size, log,
                    write_adapter if lora and lora_adapter else None)
    return summary


def write_hf_folder(out: Path, model: Any, processor: Any, summary: dict, max_shard_size: str,
                    log: Callable[[str], None], extra: Optional[Callable[[Path], None]] = None) -> None:
    """model + processor + EXPORT_INFO (and whatever `extra` adds) built beside `out`, moved into place whole."""
    with replacing(out) as tmp:
        log(f"writing {out}")
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size, safe_serialization=True)
        processor.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(summary, indent=1))


def _refuse_modality(modality: str, source: Union[str, Path]) -> None:
    if modality != "image":
        raise InteropError(f"{source}: model.modality={modality}: transformers has no class for an {modality} Q-Former "
                           f"before an LLM (X-InstructBLIP); such a run is read with tools/zero_to_safetensors.py and "
                           "loaded through model.init_from or blip_train.models.modalities.load_modalities")


def _refuse_video(video_frames: int, source: Union[str, Path]) -> None:
    if video_frames:
        raise InteropError(f"{source}: model.video_frames={video_frames}: transformers' BLIP-2 classes take images, "
                           "and its InstructBLIP video class has no frame-position embedding; a video run is read with "
                           "tools/zero_to_safetensors.py and loaded through model.init_from")
