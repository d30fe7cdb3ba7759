"""The frozen audio tower of model.modality=audio: transformers' Audio Spectrogram Transformer (ASTModel).

X-InstructBLIP puts a frozen audio encoder where BLIP-2 has its frozen ViT: the encoder's token states go
through a Q-Former of their own to the frozen LLM. The paper's encoder is BEATs, which no registry package
implements; AST is the same kind of tower (a ViT over 16 x 16 patches of a 128-bin Kaldi log-mel filterbank,
AudioSet-trained) and its released weights load as an `ASTModel` folder, so it is what this project loads.
The features it expects are computed by the data layer (`data.audio.AudioFeatures`).

Under ZeRO-3 the trainer loads it inside the same HfDeepSpeedConfig scope as the LLM, so transformers builds it
partitioned (zero.Init) like the other frozen towers.
"""
from __future__ import annotations

import torch
from torch import nn

from blip_train.config.schema import AudioConfig
from blip_train.models.freezing import freeze_

class AudioEncoder(nn.Module):
    """(N, frames, bins) normalised filterbank segments → the encoder's token states (N, 2 + patches, width)
    (AST's two summary tokens first, as the ViT's class token comes first)."""

    def __init__(self, ast: nn.Module) -> None:
        super().__init__()
        self.ast = ast
        self.width = ast.config.hidden_size
        self.frames = ast.config.max_length
        self.bins = ast.config.num_mel_bins

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        if input_values.shape[-2:] != (self.frames, self.bins):
            raise ValueError(f"audio segments of {tuple(input_values.shape[-2:])} (frames, bins); this encoder takes "
                             f"({self.frames}, {self.bins}) (its config's max_length, num_mel_bins)")
        dtype = self.ast.embeddings.patch_embeddings.projection.weight.dtype
        return self.ast(input_values=input_values.to(dtype)).last_hidden_state


def load_audio_encoder(cfg: AudioConfig, dtype: torch.dtype) -> AudioEncoder:
    """The frozen encoder from its local HF folder in `dtype` (the LLM's: under ZeRO-3 both are partitioned as they
    load, inside the trainer's HfDeepSpeedConfig scope, which has one dtype)."""
    from transformers import ASTModel

    ast = ASTModel.from_pretrained(cfg.encoder, dtype=dtype, local_files_only=True)
    return freeze_(AudioEncoder(ast))
