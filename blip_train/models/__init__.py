"""Plain nn.Modules: attention backends, masks, EVA ViT, Q-Former, freezing, HF name mapping.

Nothing here imports deepspeed or torch.distributed; world information is passed in (`world.py`).
"""
from blip_train.models.attention import attend, check_backend, resolve_backend
from blip_train.models.eva_vit import EVAViT, LayerNormFP32, interpolate_pos_embed, load_vit_weights
from blip_train.models.freezing import count_parameters, freeze_, is_frozen
from blip_train.models.masks import causal_mask, padding_mask, qformer_self_attention_mask
from blip_train.models.qformer import QFormer, QFormerOutput, load_bert_weights
from blip_train.models.world import WorldInfo

__all__ = [
    "attend", "check_backend", "resolve_backend",
    "EVAViT", "LayerNormFP32", "interpolate_pos_embed", "load_vit_weights",
    "count_parameters", "freeze_", "is_frozen",
    "causal_mask", "padding_mask", "qformer_self_attention_mask",
    "QFormer", "QFormerOutput", "load_bert_weights",
    "WorldInfo",
]
