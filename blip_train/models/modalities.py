"""X-InstructBLIP at inference: runs trained on one modality each, answering together through their shared LLM.

Each modality is trained on its own (model.modality, model.video_frames): a frozen encoder, its Q-Former, query
tokens and projection, against the same frozen LLM. At inference any subset of them reads its input and the LLM
sees, for every modality present, its prefix cue and its soft prompt, in the order the branches were given, then
the text: [prefix_a; queries_a; prefix_b; queries_b; text]. A missing modality contributes nothing: with one input
the answer is exactly that run's own.

    from blip_train.models.modalities import load_modalities
    ensemble, tokenizer = load_modalities({"image": "runs/image_run", "audio": "runs/audio_run"})
    ids = ensemble.generate({"image": pixels, "audio": None}, llm_input_ids, llm_attention_mask)

Runs with LoRA adapters change the LLM each in its own way, so they cannot share it and are refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from blip_train.models.llm_bridge import Blip2LLM


class ModalityEnsemble(nn.Module):
    """Single-modality `Blip2LLM`s that share one LLM object (their branches), answering together."""

    def __init__(self, branches: Mapping[str, Blip2LLM]) -> None:
        super().__init__()
        if not branches:
            raise ValueError("no modality given")
        if len({id(b.llm) for b in branches.values()}) != 1:
            raise ValueError("the modalities' models must share one LLM object (build them with the same `llm`)")
        adapted = [name for name, b in branches.items() if b.lora_modules]
        if adapted:
            raise ValueError(f"{', '.join(adapted)}: trained with LoRA adapters on the LLM (model.llm.lora), which "
                             "the other modalities' soft prompts were not trained against")
        self.branches = nn.ModuleDict(dict(branches))

    @property
    def first(self) -> Blip2LLM:
        return next(iter(self.branches.values()))

    def input_embeds(self, inputs: Mapping[str, Optional[torch.Tensor]], llm_input_ids: Optional[torch.Tensor] = None,
                     llm_attention_mask: Optional[torch.Tensor] = None,
                     qformer_input_ids: Optional[torch.Tensor] = None,
                     qformer_attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's input embeddings and mask: each given modality's [prefix; soft prompt] in branch order, then
        the text (see Blip2LLM.generate). inputs: modality → its encoder input (None or absent: missing).
        qformer_input_ids: the instruction, read by the branches that take text (one Q-Former tokenizer)."""
        unknown = sorted(k for k, v in inputs.items() if v is not None and k not in self.branches)
        if unknown:
            raise ValueError(f"no model for modality {', '.join(unknown)} (have: {', '.join(self.branches)})")
        present = [(name, b) for name, b in self.branches.items() if inputs.get(name) is not None]
        if not present:
            raise ValueError(f"no input for any modality (have models for: {', '.join(self.branches)})")
        batch = inputs[present[0][0]].shape[0]
        ids, mask = self.first.text_or_start(llm_input_ids, llm_attention_mask, batch, inputs[present[0][0]].device)
        parts, masks = [], []
        for name, branch in present:
            text_in = branch.text_to_qformer
            soft = branch.soft_prompt(inputs[name], qformer_input_ids if text_in else None,
                                      qformer_attention_mask if text_in else None)
            embeds, m = branch.llm_inputs(soft, ids[:, :0], mask[:, :0])  # [prefix; soft prompt] alone
            parts.append(embeds)
            masks.append(m)
        text = self.first.llm.get_input_embeddings()(ids)
        return torch.cat(parts + [text], dim=1), torch.cat(masks + [mask], dim=1)

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, Optional[torch.Tensor]], llm_input_ids: Optional[torch.Tensor] = None,
                 llm_attention_mask: Optional[torch.Tensor] = None, qformer_input_ids: Optional[torch.Tensor] = None,
                 qformer_attention_mask: Optional[torch.Tensor] = None, **options: Any) -> torch.Tensor:
        """Token ids the LLM generates after `input_embeds` (options: Blip2LLM.generate_from; the repetition
        penalty defaults to InstructBLIP's when the first branch is an InstructBLIP run)."""
        embeds, mask = self.input_embeds(inputs, llm_input_ids, llm_attention_mask, qformer_input_ids,
                                         qformer_attention_mask)
        return self.first.generate_from(embeds, mask, **options)


def load_modalities(runs: Mapping[str, Union[str, Path]], device_type: str = "cpu") -> tuple[ModalityEnsemble, Any]:
    """The ensemble of trained runs (modality name → run folder, checkpoint tag or weights file beside a run's
    config.yaml), their frozen parts from the sources their configs name, the LLM loaded once. Returns it and the
    LLM's tokenizer. The runs must name the same LLM folder, dtype and Q-Former tokenizer."""
    from blip_train.config import load_config
    from blip_train.training.stages import build_llm_stage_model

    branches: dict[str, Blip2LLM] = {}
    llm, shared, tokenizer = None, None, None
    for name, source in runs.items():
        source = Path(source)
        run = next((p for p in (source, *source.parents) if (p / "config.yaml").is_file()), None)
        if run is None:
            raise ValueError(f"{name}: {source} is not inside a run folder (no config.yaml beside it or above it)")
        cfg = load_config(str(run / "config.yaml"), [f"model.init_from={source}"])
        m = cfg.model
        key = (m.llm.path, m.llm.dtype, m.qformer.tokenizer)
        if shared is not None and key != shared:
            raise ValueError(f"{name}: {run} uses LLM {m.llm.path} ({m.llm.dtype}) and Q-Former tokenizer "
                             f"{m.qformer.tokenizer}; the first run {shared[0]} ({shared[1]}) and {shared[2]}")
        model, tokenizer, _ = build_llm_stage_model(cfg, device_type, llm=llm)
        llm, shared = model.llm, key
        branches[name] = model.eval()
    return ModalityEnsemble(branches), tokenizer
