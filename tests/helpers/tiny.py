"""Tiny configs shared by the tests: ours and the matching transformers configs.

Everything is small enough to build and run in milliseconds on one CPU thread. The HF builders
describe exactly the modules our configs build, so weights copied through `hf_names` must give the
same outputs.
"""
from __future__ import annotations

from dataclasses import replace

from blip_train.config.schema import ModelConfig, QFormerConfig, TextConfig, VisionConfig


def tiny_vision_config(**overrides) -> VisionConfig:
    """32 px images, 8 px patches (4x4 grid, 17 tokens), width 32, 3 pretrained blocks (2 built)."""
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=3, drop_last_block=True, heads=4,
                       mlp_dim=64, layer_norm_eps=1e-6, precision="fp32")
    return replace(cfg, **overrides)


def tiny_qformer_config(**overrides) -> QFormerConfig:
    """2 layers of width 32 (4 heads), cross-attention in layer 0, 4 queries, vocab 120."""
    cfg = QFormerConfig(hidden_size=32, layers=2, heads=4, intermediate_size=64, vocab_size=120,
                        max_position_embeddings=64, cross_attention_freq=2, num_query_tokens=4,
                        layer_norm_eps=1e-12, dropout=0.0)
    return replace(cfg, **overrides)


def tiny_text_config(**overrides) -> TextConfig:
    """MED: 2 layers of width 32 (4 heads), cross-attention in every layer, a decoder, vocab 120."""
    cfg = TextConfig(hidden_size=32, layers=2, heads=4, intermediate_size=64, vocab_size=120,
                     max_position_embeddings=64, layer_norm_eps=1e-12, dropout=0.0, fusion_layer=0, decoder=True)
    return replace(cfg, **overrides)


def tiny_model_config(**overrides) -> ModelConfig:
    """ModelConfig with the tiny towers above and SDPA attention."""
    cfg = ModelConfig(embed_dim=16, max_txt_len=12, attention="sdpa", vision=tiny_vision_config(),
                      qformer=tiny_qformer_config())
    return replace(cfg, **overrides)


def vision_blocks(cfg: VisionConfig) -> int:
    """Blocks our EVAViT builds for `cfg` (HF configs count built blocks, not pretrained ones)."""
    return cfg.layers - 1 if cfg.drop_last_block else cfg.layers


def hf_vision_config(cfg: VisionConfig):
    """transformers Blip2VisionConfig equal to `cfg` (exact GELU, fused q/v bias, eager attention)."""
    from transformers import Blip2VisionConfig

    hf = Blip2VisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                           num_hidden_layers=vision_blocks(cfg), num_attention_heads=cfg.heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="gelu",
                           layer_norm_eps=cfg.layer_norm_eps, attention_dropout=0.0, qkv_bias=True)
    hf._attn_implementation = "eager"
    return hf


def hf_blip_vision_config(cfg: VisionConfig):
    """transformers BlipVisionConfig equal to `cfg` built with `final_norm` (exact GELU, no dropout)."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=vision_blocks(cfg),
                            num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                            hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps, attention_dropout=0.0)


def hf_blip_text_config(cfg: TextConfig, encoder_width: int):
    """transformers BlipTextConfig equal to a BLIP MED `cfg` (cross-attention in every layer: is_decoder)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, encoder_hidden_size=encoder_width,
                          intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                          num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_position_embeddings,
                          hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.dropout,
                          attention_probs_dropout_prob=cfg.dropout, is_decoder=True)


def _qformer_kwargs(cfg: QFormerConfig, encoder_width: int) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate_size, hidden_act="gelu",
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
                cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=encoder_width)


def hf_qformer_config(cfg: QFormerConfig, encoder_width: int, text_input: bool = True):
    """transformers Blip2QFormerConfig equal to `cfg`; `text_input` builds the text FFN too."""
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(use_qformer_text_input=text_input, **_qformer_kwargs(cfg, encoder_width))


def hf_instructblip_qformer_config(cfg: QFormerConfig, encoder_width: int):
    """transformers InstructBlipQFormerConfig equal to `cfg` (it owns its text embeddings)."""
    from transformers import InstructBlipQFormerConfig

    return InstructBlipQFormerConfig(**_qformer_kwargs(cfg, encoder_width))


def hf_blip2_config(vision: VisionConfig, qformer: QFormerConfig, text_config=None):
    """transformers Blip2Config over the tiny towers (text_config: a tiny LM config, e.g. OPTConfig)."""
    from transformers import Blip2Config

    return Blip2Config(vision_config=hf_vision_config(vision).to_dict(),
                       qformer_config=hf_qformer_config(qformer, vision.width).to_dict(),
                       text_config=None if text_config is None else text_config.to_dict(),
                       num_query_tokens=qformer.num_query_tokens)


def tiny_bert_config(cfg: QFormerConfig | TextConfig, vocab_size: int | None = None):
    """transformers BertConfig with the Q-Former's / MED's shape (vocab defaults to one less: no [DEC])."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size or cfg.vocab_size - 1, hidden_size=cfg.hidden_size,
                      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                      intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                      layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu")
