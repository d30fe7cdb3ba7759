"""Several single-modality models answering together through their shared LLM (X-InstructBLIP's inference):
each present modality's [prefix; soft prompt] in branch order, then the text; a missing one adds nothing."""
from __future__ import annotations

import pytest
import torch

from blip_train.models.llm_bridge import Blip2LLM, load_llm
from blip_train.models.modalities import ModalityEnsemble
from tests.unit.test_audio_model import BINS, FRAMES, SEGMENTS, ast_dir, audio_config  # noqa: F401 (fixture)
from tests.unit.test_llm_bridge import bridge_config, llm_dirs, make_batch  # noqa: F401 (fixture)


def branches(llm_dirs, ast_dir, lora: int = 0):  # noqa: F811
    image_cfg = bridge_config("instruct", str(llm_dirs["llama"]))
    audio_cfg = audio_config("llama", llm_dirs, ast_dir)
    audio_cfg.llm.lora.r = lora
    llm = load_llm(image_cfg.llm, "cpu")
    torch.manual_seed(0)
    image = Blip2LLM(image_cfg, llm, device_type="cpu").eval()
    torch.manual_seed(1)
    audio = Blip2LLM(audio_cfg, llm, device_type="cpu", prefix_ids=[7, 8, 9]).eval()
    return image, audio


def test_any_subset_of_modalities_answers_and_a_missing_one_adds_nothing(llm_dirs, ast_dir):  # noqa: F811
    image, audio = branches(llm_dirs, ast_dir)
    ensemble = ModalityEnsemble({"image": image, "audio": audio})
    batch = make_batch(bridge_config("instruct"), decoder_only=True, instruct=True)
    b = batch["llm_input_ids"].shape[0]
    sound = torch.randn(b, SEGMENTS, FRAMES, BINS, generator=torch.Generator().manual_seed(2))
    text = dict(llm_input_ids=batch["llm_input_ids"], llm_attention_mask=batch["llm_attention_mask"],
                qformer_input_ids=batch["qformer_input_ids"], qformer_attention_mask=batch["qformer_attention_mask"])
    options = dict(num_beams=1, max_new_tokens=4, min_new_tokens=4)
    with torch.no_grad():
        # Audio alone (the image missing): exactly the audio run's own answer; and the image alone, the image run's.
        alone = ensemble.generate({"audio": sound, "image": None}, **text, **options)
        assert torch.equal(alone, audio.generate(sound, **text, **options))
        assert torch.equal(ensemble.generate({"image": batch["pixel_values"]}, **text, **options),
                           image.generate(batch["pixel_values"], **text, **options))
        # Both: the image's soft prompt, then the audio's prefix and soft prompt, then the text.
        embeds, mask = ensemble.input_embeds({"image": batch["pixel_values"], "audio": sound}, **text)
        img = image.soft_prompt(batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"])
        aud = audio.soft_prompt(sound, batch["qformer_input_ids"], batch["qformer_attention_mask"])
        table = image.llm.get_input_embeddings()
        expected = torch.cat([img, table(torch.tensor([7, 8, 9])).expand(b, -1, -1), aud,
                              table(batch["llm_input_ids"])], dim=1)
        assert torch.equal(embeds, expected)
        assert torch.equal(mask[:, -batch["llm_input_ids"].shape[1]:], batch["llm_attention_mask"])
        assert bool(mask[:, :-batch["llm_input_ids"].shape[1]].eq(1).all())
        both = ensemble.generate({"image": batch["pixel_values"], "audio": sound}, **text, **options)
        assert both.shape == alone.shape
    with pytest.raises(ValueError, match="no input for any modality"):
        ensemble.generate({"audio": None}, **text)
    with pytest.raises(ValueError, match="no model for modality 3d"):
        ensemble.generate({"3d": torch.zeros(1)}, **text)


def test_models_that_cannot_share_the_llm_are_refused(llm_dirs, ast_dir):  # noqa: F811
    image, _ = branches(llm_dirs, ast_dir)
    _, other = branches(llm_dirs, ast_dir)  # its own LLM object
    with pytest.raises(ValueError, match="share one LLM object"):
        ModalityEnsemble({"image": image, "audio": other})
    image, adapted = branches(llm_dirs, ast_dir, lora=4)
    with pytest.raises(ValueError, match="audio: trained with LoRA adapters"):
        ModalityEnsemble({"image": image, "audio": adapted})
