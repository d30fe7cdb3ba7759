"""Our model config <-> transformers' BLIP-2 / InstructBLIP configs, processors and generation configs.

arch      transformers class                        state-dict layout (hf_names.QFORMER_LAYOUTS)
stage1    Blip2ForImageTextRetrieval                blip2_retrieval
stage2    Blip2ForConditionalGeneration             blip2_generation   (Q-Former without text input)
instruct  InstructBlipForConditionalGeneration      instructblip_generation
blip      BlipForImageTextRetrieval (default) /     hf_names_blip.BLIP_LAYOUTS (BLIP_CLASSES; the user picks the
          BlipForConditionalGeneration /            class: one BLIP run holds all three)
          BlipForQuestionAnswering
Our EVA ViT counts pretrained blocks and may drop the last (`drop_last_block`); transformers counts
the blocks it builds. Both use exact GELU; the vision qkv has q and v biases only (HF: a fused bias
with a zero k part).
"""
from __future__ import annotations

from typing import Any, Optional

from blip_train.config.schema import ModelConfig
from blip_train.interop.weights_io import InteropError

LAYOUTS = {"stage1": "blip2_retrieval", "stage2": "blip2_generation", "instruct": "instructblip_generation"}
HF_CLASSES = {"stage1": "Blip2ForImageTextRetrieval", "stage2": "Blip2ForConditionalGeneration",
              "instruct": "InstructBlipForConditionalGeneration"}
ARCH_OF_CLASS = {v: k for k, v in HF_CLASSES.items()}
IMAGE_TOKEN = "<image>"
INSTRUCT_GENERATION = {"num_beams": 5, "max_new_tokens": 256, "min_new_tokens": 1, "repetition_penalty": 1.5,
                       "length_penalty": 1.0}
"""InstructBLIP's published decoding defaults (DESIGN.md §4)."""
END_OF_TEXT = {"opt": "\n"}
"""As training/stages.py: BLIP-2 trains OPT to end a caption with a newline."""


def hf_class(arch: str) -> type:
    import transformers

    if arch not in HF_CLASSES:
        raise InteropError(f"model.arch {arch!r} has no transformers counterpart (one of {', '.join(HF_CLASSES)})")
    return getattr(transformers, HF_CLASSES[arch])


def built_blocks(m: ModelConfig) -> int:
    return m.vision.layers - 1 if m.vision.drop_last_block else m.vision.layers


def _qformer_kwargs(m: ModelConfig) -> dict:
    q = m.qformer
    return dict(vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.layers,
                num_attention_heads=q.heads, intermediate_size=q.intermediate_size, hidden_act="gelu",
                hidden_dropout_prob=q.dropout, attention_probs_dropout_prob=q.dropout,
                max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
                cross_attention_frequency=q.cross_attention_freq, encoder_hidden_size=m.vision.width)


def hf_config_for(m: ModelConfig, text_config: Any = None, image_token_index: Optional[int] = None):
    """The transformers config of `m.arch` over our tower sizes (text_config: the LLM's, for stage2/instruct)."""
    from transformers import (Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, InstructBlipConfig,
                              InstructBlipQFormerConfig)

    v = m.vision
    vision = Blip2VisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=built_blocks(m),
                               num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                               hidden_act="gelu", layer_norm_eps=v.layer_norm_eps, attention_dropout=0.0,
                               qkv_bias=True).to_dict()
    text = None if text_config is None else text_config.to_dict()
    if m.arch == "instruct":
        qformer = InstructBlipQFormerConfig(**_qformer_kwargs(m)).to_dict()
        cfg = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                                 num_query_tokens=m.qformer.num_query_tokens, image_token_index=image_token_index)
    else:
        # Stage 2 never feeds text to the Q-Former (its text branch is removed); retrieval does.
        qformer = Blip2QFormerConfig(use_qformer_text_input=m.arch == "stage1", **_qformer_kwargs(m)).to_dict()
        cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                          num_query_tokens=m.qformer.num_query_tokens, image_text_hidden_size=m.embed_dim,
                          image_token_index=image_token_index)
    cfg.architectures = [HF_CLASSES[m.arch]]
    return cfg


def arch_of_hf_config(hf_cfg: Any, where: str) -> str:
    """stage1 | stage2 | instruct from a BLIP-2 / InstructBLIP config's `architectures`."""
    names = list(getattr(hf_cfg, "architectures", None) or [])
    for name in names:
        if name in ARCH_OF_CLASS:
            return ARCH_OF_CLASS[name]
    raise InteropError(f"{where}: architectures {names or 'unset'} — expected one of {', '.join(ARCH_OF_CLASS)}")


def model_section_from_hf(hf_cfg: Any, where: str) -> dict:
    """Our `model:` config section (as a dict) equal to a transformers BLIP-2 / InstructBLIP config."""
    arch = arch_of_hf_config(hf_cfg, where)
    v, q = hf_cfg.vision_config, hf_cfg.qformer_config
    for name, act in (("vision_config", v.hidden_act), ("qformer_config", q.hidden_act)):
        if act != "gelu":
            raise InteropError(f"{where}: {name}.hidden_act={act!r}; our towers use exact GELU ('gelu')")
    if not getattr(v, "qkv_bias", True):
        raise InteropError(f"{where}: vision_config.qkv_bias=False; the EVA ViT has q and v biases")
    dropout = q.hidden_dropout_prob
    section = {
        "arch": arch,
        "embed_dim": int(getattr(hf_cfg, "image_text_hidden_size", 256)),
        "vision": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size,
                   "layers": v.num_hidden_layers, "drop_last_block": False, "heads": v.num_attention_heads,
                   "mlp_dim": v.intermediate_size, "layer_norm_eps": v.layer_norm_eps},
        "qformer": {"hidden_size": q.hidden_size, "layers": q.num_hidden_layers, "heads": q.num_attention_heads,
                    "intermediate_size": q.intermediate_size, "vocab_size": q.vocab_size,
                    "max_position_embeddings": q.max_position_embeddings,
                    "cross_attention_freq": q.cross_attention_frequency,
                    "num_query_tokens": hf_cfg.num_query_tokens, "layer_norm_eps": q.layer_norm_eps,
                    "dropout": dropout},
    }
    return section


def image_processor_for(image_size: int):
    """BLIP's image processor doing what our EvalTransform does: bicubic resize, CLIP mean/std."""
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    from blip_train.data.transforms import CLIP_MEAN, CLIP_STD

    return BlipImageProcessor(size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                              image_std=list(CLIP_STD), do_convert_rgb=True)


def build_processor(arch: str, image_size: int, num_query_tokens: int, llm_tokenizer: Any = None,
                    qformer_tokenizer: Any = None):
    """Blip2Processor (stage1: over the Q-Former tokenizer, no image tokens; stage2: over the LLM
    tokenizer) or InstructBlipProcessor. The LLM tokenizer gains `<image>` here (transformers' rule)."""
    from transformers import Blip2Processor, InstructBlipProcessor

    images = image_processor_for(image_size)
    if arch == "stage1":
        return Blip2Processor(images, qformer_tokenizer, num_query_tokens=None)
    if arch == "stage2":
        return Blip2Processor(images, llm_tokenizer, num_query_tokens=num_query_tokens)
    return InstructBlipProcessor(images, llm_tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens)


def generation_config_for(arch: str, llm_config: Any, llm_tokenizer: Any, num_beams: int, max_new_tokens: int,
                          suppress: Optional[list[int]] = None):
    """Decoding defaults of the exported model: stage 2 the run's eval settings (OPT also stops at a
    newline, as it was trained to); InstructBLIP its published defaults. `suppress`: token ids never
    to generate (the `<image>` placeholder)."""
    from transformers import GenerationConfig

    held = llm_config.eos_token_id  # an int, or a list (an LLM folder imported from an export of ours)
    eos: list[int] = [int(e) for e in (held if isinstance(held, (list, tuple)) else [held]) if e is not None]
    end_text = END_OF_TEXT.get(llm_config.model_type) if arch == "stage2" else None
    if end_text is not None:
        end_ids = llm_tokenizer(end_text, add_special_tokens=False)["input_ids"]
        if len(end_ids) == 1 and end_ids[0] not in eos:
            eos.append(int(end_ids[0]))
    kw: dict[str, Any] = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=1)
    if arch == "instruct":
        kw.update(INSTRUCT_GENERATION)
    gen = GenerationConfig(bos_token_id=llm_config.bos_token_id, pad_token_id=llm_config.pad_token_id,
                           eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
                           decoder_start_token_id=getattr(llm_config, "decoder_start_token_id", None), **kw)
    if suppress:
        gen.suppress_tokens = list(suppress)
    return gen


def carry_generation_defaults_(text_config: Any, gen: Any) -> None:
    """Write the decoding defaults of `gen` (the exported generation_config.json) into the LLM's config.

    Blip2 / InstructBlipForConditionalGeneration.generate hands over to `language_model.generate`, which
    decodes with the language model's own generation config; transformers builds that one, when it
    loads the folder, from `text_config` (GenerationConfig.from_model_config), never from
    generation_config.json (that one only reaches the outer model). Without this copy every saved
    default is silently dropped: min_new_tokens (an instruction-tuned T5 whose first choice is </s>
    answers ""), beams, InstructBLIP's repetition penalty, the suppressed `<image>`, OPT's "\n" stop."""
    for key, value in gen.to_diff_dict().items():
        if key != "transformers_version":
            setattr(text_config, key, value)


DECODING_KEYS = ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "length_penalty",
                 "suppress_tokens")
"""Decoding defaults `carry_generation_defaults_` may put in a text_config (the token ids are its own)."""


def without_decoding_defaults(text_config: Any) -> Any:
    """A copy of `text_config` for a plain LLM folder (import_hf): the BLIP model's decoding defaults
    left out (save_pretrained would move them, warning, into the LLM's generation_config.json)."""
    import copy

    out = copy.deepcopy(text_config)
    for key in DECODING_KEYS:
        out.__dict__.pop(key, None)
    return out


def assign_into(model: Any, sd: dict, where: str) -> Any:
    """Load `sd` into a meta-device transformers model by assignment (no copies), shapes checked first
    (torch would raise a multi-line error), tied weights re-tied. Returns load_state_dict's result."""
    expected = model.state_dict()
    for name, t in sd.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise InteropError(f"{where}: {name} has shape {tuple(t.shape)}, the config implies "
                               f"{tuple(expected[name].shape)}")
    result = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()  # assignment replaced tied parameters by separate (equal) tensors
    return result


# ----------------------------------------------------------------------------------- BLIP (ViT + MED)

BLIP_CLASSES = {"BlipForImageTextRetrieval": "blip_retrieval", "BlipForConditionalGeneration": "blip_captioning",
                "BlipForQuestionAnswering": "blip_vqa"}
"""transformers class -> state-dict layout (hf_names_blip.BLIP_LAYOUTS) for model.arch=blip."""
BLIP_DEFAULT_CLASS = "BlipForImageTextRetrieval"


def blip_class(name: str) -> type:
    import transformers

    if name not in BLIP_CLASSES:
        raise InteropError(f"--hf-class {name!r}: model.arch=blip exports to one of {', '.join(BLIP_CLASSES)}")
    return getattr(transformers, name)


def blip_hf_config_for(m: ModelConfig, tokenizer: Any, class_name: str, temp: Optional[float] = None):
    """BlipConfig over our ViT + MED sizes. Token ids from the BLIP tokenizer: bos = [DEC] (the decoder's first
    token), eos = sep = [SEP] (where a caption ends). `temp`, the ITC temperature, is stored as
    `logit_scale_init_value` = ln(1/temp), BlipModel's CLIP-style logit scale: no BLIP class has a parameter
    for it, and import_hf reads it back."""
    import math

    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    from blip_train.models.blip_losses import LM_LABEL_SMOOTHING

    v, t = m.vision, m.text
    vision = BlipVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=built_blocks(m),
                              num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                              hidden_act="gelu", layer_norm_eps=v.layer_norm_eps, attention_dropout=0.0)
    # is_decoder=True builds the cross-attention of every layer (BLIP's MED cross-attends in all of them);
    # BlipTextModel still runs bidirectionally unless called with is_decoder=True.
    text = BlipTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, encoder_hidden_size=v.width,
                          intermediate_size=t.intermediate_size, num_hidden_layers=t.layers,
                          num_attention_heads=t.heads, max_position_embeddings=t.max_position_embeddings, hidden_act="gelu",
                          layer_norm_eps=t.layer_norm_eps, hidden_dropout_prob=t.dropout,
                          attention_probs_dropout_prob=t.dropout, is_decoder=True,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
                          label_smoothing=LM_LABEL_SMOOTHING)
    extra = {} if temp is None else {"logit_scale_init_value": math.log(1.0 / temp)}
    cfg = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=m.embed_dim,
                     image_text_hidden_size=m.embed_dim, label_smoothing=LM_LABEL_SMOOTHING, **extra)
    cfg.architectures = [class_name]
    return cfg


def blip_generation_config(tokenizer: Any, num_beams: int, max_new_tokens: int, min_new_tokens: int,
                           length_penalty: float):
    """Decoding defaults of an exported BLIP decoder (the run's eval settings): starts at [DEC], ends at [SEP]."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.sep_token_id,
                            pad_token_id=tokenizer.pad_token_id, num_beams=num_beams, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, length_penalty=length_penalty)


def model_section_from_blip_hf(hf_cfg: Any, where: str) -> dict:
    """Our `model:` section (a dict, arch=blip) equal to a transformers BlipConfig."""
    v, t = hf_cfg.vision_config, hf_cfg.text_config
    for name, act in (("vision_config", v.hidden_act), ("text_config", t.hidden_act)):
        if act != "gelu":
            raise InteropError(f"{where}: {name}.hidden_act={act!r}; our towers use exact GELU ('gelu')")
    if not t.is_decoder:
        raise InteropError(f"{where}: text_config.is_decoder=False builds no cross-attention; BLIP's MED has it")
    return {
        "arch": "blip",
        "embed_dim": int(hf_cfg.image_text_hidden_size),
        "vision": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size,
                   "layers": v.num_hidden_layers, "drop_last_block": False, "heads": v.num_attention_heads,
                   "mlp_dim": v.intermediate_size, "layer_norm_eps": v.layer_norm_eps, "frozen": False,
                   "final_norm": True},
        "text": {"hidden_size": t.hidden_size, "layers": t.num_hidden_layers, "heads": t.num_attention_heads,
                 "intermediate_size": t.intermediate_size, "vocab_size": t.vocab_size,
                 "max_position_embeddings": t.max_position_embeddings, "layer_norm_eps": t.layer_norm_eps,
                 "dropout": t.hidden_dropout_prob, "fusion_layer": 0, "decoder": True},
    }


def build_blip_processor(image_size: int, tokenizer: Any):
    """BlipProcessor: the image processor our EvalTransform matches, and the BLIP tokenizer ([DEC] bos, [ENC])."""
    from transformers import BlipProcessor

    return BlipProcessor(image_processor_for(image_size), tokenizer)
