"""BLIP-2 VQA fine-tuning (stage 2 with model.qformer_text_input): the question enters the Q-Former through
InstructBLIP's instruction path, so on the same weights and batch it is InstructBLIP, exactly; and the
VQA / captioning evaluation protocols (prompts, beams, lengths, length penalty) reach generate."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from blip_train.config.schema import ExperimentConfig, LLMConfig, StreamConfig
from blip_train.models.llm_bridge import Blip2LLM, init_from_earlier_stage_, load_llm
from blip_train.models.world import WorldInfo
from blip_train.training.stages import build_stage
from tests.helpers.tiny import tiny_model_config
from tests.unit.test_llm_bridge import _llm_folder_with_tokenizer

PROMPT = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}
QUESTIONS = ["what color is it?", "is the circle on the left?", "what shape is it"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from blip_train.data.tokenizers import train_wordpiece_tokenizer

    root = tmp_path_factory.mktemp("vqa")
    train_wordpiece_tokenizer(["question: what color is the circle? answer: red", "is it on the left",
                               "short answer: what shape"] * 5, 100, root / "q")
    return {"q": root / "q", **{k: _llm_folder_with_tokenizer(k, root / k) for k in ("opt", "t5")}}


def experiment(arch: str, kind: str, folders, question_aware: bool = False) -> ExperimentConfig:
    llm = LLMConfig(path=str(folders[kind]), dtype="fp32", prompt=PROMPT[kind] if question_aware else "")
    model = tiny_model_config(arch=arch, llm=llm, qformer_text_input=question_aware)
    model.qformer.tokenizer = str(folders["q"])
    cfg = ExperimentConfig(model=model)
    cfg.data.train = [StreamConfig(local="unused-here")]
    return cfg


def vqa_samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=g), "task": "vqa", "question": q, "answer": a,
             "answers": [a] * 3, "caption": "", "draw_seed": i}
            for i, (q, a) in enumerate(zip(QUESTIONS, ["red", "yes", "a blue square"]))]


def llm_text_ids(batch: dict, row: int) -> list[int]:
    return batch["llm_input_ids"][row][batch["llm_attention_mask"][row] == 1].tolist()


def holds(ids: list[int], tokenizer, text: str) -> bool:
    """`ids` holds the tokens of `text` (tokenised alone) as one run."""
    sub = tokenizer(text, add_special_tokens=False)["input_ids"]
    return any(ids[i:i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_question_aware_stage2_is_instructblip_on_the_same_weights(kind, folders):
    vqa = build_stage(experiment("stage2", kind, folders, question_aware=True), WorldInfo(), on_cuda=False)
    ins = build_stage(experiment("instruct", kind, folders), WorldInfo(), on_cuda=False)
    assert vqa.data_kind == "vqa"
    # The same modules: each model's state loads strictly into the other.
    assert set(vqa.model.state_dict()) == set(ins.model.state_dict())
    ins.model.load_state_dict(vqa.model.state_dict(), strict=True)
    vqa.model.eval(), ins.model.eval()

    batch = vqa.collate(vqa_samples())
    # The question reaches the Q-Former ([CLS] template [SEP]) and, in the same template, the LLM.
    qtok = vqa.collate.qtok
    filled = PROMPT[kind].replace("{}", QUESTIONS[0])
    n = int(batch["qformer_attention_mask"][0].sum())
    assert batch["qformer_input_ids"][0, :n].tolist() == qtok(filled)["input_ids"]
    assert holds(llm_text_ids(batch, 0), vqa.tokenizer, filled)

    with torch.no_grad():
        soft_vqa = vqa.model.soft_prompt(batch["pixel_values"].float(), batch["qformer_input_ids"],
                                         batch["qformer_attention_mask"])
        soft_ins = ins.model.soft_prompt(batch["pixel_values"].float(), batch["qformer_input_ids"],
                                         batch["qformer_attention_mask"])
        loss_vqa, loss_ins = vqa.model(dict(batch, pixel_values=batch["pixel_values"].float()))["loss"], \
            ins.model(dict(batch, pixel_values=batch["pixel_values"].float()))["loss"]
        embeds, mask = vqa.model.llm_inputs(soft_vqa, batch["llm_input_ids"], batch["llm_attention_mask"])
        embeds_i, mask_i = ins.model.llm_inputs(soft_ins, batch["llm_input_ids"], batch["llm_attention_mask"])
        if vqa.model.decoder_only:
            logits_vqa = vqa.model.llm(inputs_embeds=embeds, attention_mask=mask).logits
            logits_ins = ins.model.llm(inputs_embeds=embeds_i, attention_mask=mask_i).logits
        else:
            dec = vqa.model.llm.prepare_decoder_input_ids_from_labels(labels=batch["llm_labels"])
            logits_vqa = vqa.model.llm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
            logits_ins = ins.model.llm(inputs_embeds=embeds_i, attention_mask=mask_i, decoder_input_ids=dec).logits
    assert torch.equal(soft_vqa, soft_ins)
    assert torch.equal(logits_vqa, logits_ins)
    assert torch.equal(loss_vqa, loss_ins) and torch.isfinite(loss_vqa)

    # The question matters: another question changes what the queries hand to the LLM...
    other = vqa.collate(vqa_samples())
    other_ids = other["qformer_input_ids"].roll(1, dims=0)
    other_mask = other["qformer_attention_mask"].roll(1, dims=0)
    with torch.no_grad():
        moved = vqa.model.soft_prompt(batch["pixel_values"].float(), other_ids, other_mask)
        # ...and a plain stage-2 model on the same shared weights never sees it.
        plain = Blip2LLM(replace(experiment("stage2", kind, folders).model), load_llm(vqa.cfg.model.llm, "cpu"),
                         device_type="cpu").eval()
        plain.load_state_dict({k: v for k, v in vqa.model.state_dict().items() if k in plain.state_dict()})
        blind = plain.soft_prompt(batch["pixel_values"].float())
    assert not torch.allclose(moved, soft_vqa)
    assert not torch.allclose(blind, soft_vqa)


def test_question_aware_init_from_stage2_keeps_text_input(folders):
    cfg = experiment("stage2", "opt", folders, question_aware=True).model
    torch.manual_seed(0)
    s2 = Blip2LLM(replace(cfg, qformer_text_input=False), load_llm(cfg.llm, "cpu"), device_type="cpu")
    sd = {n: p.detach() + 1 for n, p in s2.named_parameters() if p.requires_grad}
    vqa = Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu")
    report = init_from_earlier_stage_(vqa, sd)
    assert "qformer.embeddings.word_embeddings.weight" in report["missing"]
    assert torch.equal(vqa.llm_proj.weight, sd["llm_proj.weight"])
    with pytest.raises(ValueError, match="needs qformer_input_ids"):
        vqa.soft_prompt(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("question_aware", [False, True])
def test_vqa_eval_protocol(kind, question_aware, folders):
    """BLIP-2's VQA protocol: the LLM's prompt template with the question, beam 5, at most 10 new tokens,
    length penalty -1; the question enters the Q-Former only for a model trained that way."""
    from blip_train.evaluation.generative_eval import generation_setup

    cfg = experiment("stage2", kind, folders, question_aware=question_aware)
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    collate, gen = generation_setup(cfg, stage.model, stage.tokenizer, "vqa")
    assert gen["num_beams"] == 5 and gen["max_new_tokens"] == 10 and gen["length_penalty"] == -1.0
    assert ("eos_token_id" in gen) == (kind == "opt")  # OPT stage 2 ends its text with "\n"
    batch = collate(vqa_samples())
    assert ("qformer_input_ids" in batch) == question_aware
    mask = batch["llm_attention_mask"][1]
    assert holds(llm_text_ids(batch, 1), stage.tokenizer, PROMPT[kind].replace("{}", QUESTIONS[1]))
    if kind == "opt":
        assert mask[0] == 0 or mask.all()  # left-padded: generation continues every row at its end
    out = stage.model.eval().generate(**{k: batch[k] for k in batch if k in (
        "pixel_values", "llm_input_ids", "llm_attention_mask", "qformer_input_ids", "qformer_attention_mask")},
        **{**gen, "num_beams": 2})
    assert out.shape[0] == len(QUESTIONS)


def test_eval_settings_reach_generate(folders):
    from blip_train.evaluation.generative_eval import generation_setup

    cfg = experiment("stage2", "opt", folders)
    cfg.eval = replace(cfg.eval, num_beams=3, max_new_tokens=30, min_new_tokens=8, length_penalty=0.5,
                       vqa_prompt="Q: {} A:", vqa_max_new_tokens=7, vqa_length_penalty=-2.0)
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    _, cap = generation_setup(cfg, stage.model, stage.tokenizer, "caption")
    assert (cap["num_beams"], cap["max_new_tokens"], cap["min_new_tokens"], cap["length_penalty"]) == (3, 30, 8, 0.5)
    collate, vqa = generation_setup(cfg, stage.model, stage.tokenizer, "vqa")
    assert (vqa["num_beams"], vqa["max_new_tokens"], vqa["length_penalty"]) == (3, 7, -2.0)
    batch = collate(vqa_samples())
    assert holds(llm_text_ids(batch, 0), stage.tokenizer, "Q: what color is it? A:")
    # InstructBLIP keeps its own eval instruction unless eval.vqa_prompt replaces it.
    ins_cfg = experiment("instruct", "opt", folders)
    ins = build_stage(ins_cfg, WorldInfo(), on_cuda=False)
    default_batch = generation_setup(ins_cfg, ins.model, ins.tokenizer, "vqa")[0](vqa_samples())
    ins_cfg.eval = replace(ins_cfg.eval, vqa_prompt="Q: {} A:")
    custom_batch = generation_setup(ins_cfg, ins.model, ins.tokenizer, "vqa")[0](vqa_samples())
    assert default_batch["qformer_input_ids"].shape != custom_batch["qformer_input_ids"].shape or not torch.equal(
        default_batch["qformer_input_ids"], custom_batch["qformer_input_ids"])


def test_question_aware_training_refuses_rows_without_a_question(folders):
    stage = build_stage(experiment("stage2", "t5", folders, question_aware=True), WorldInfo(), on_cuda=False)
    rows = vqa_samples()
    other_task = stage.collate([dict(rows[0], task="vqa_short"), rows[1]])  # any task with a question: the template
    assert torch.equal(other_task["qformer_input_ids"], stage.collate(rows[:2])["qformer_input_ids"])
    with pytest.raises(ValueError, match="a 'caption' row of dataset 'coco' has none"):
        stage.collate([rows[0], dict(rows[1], task="caption", question="", dataset="coco", caption="a cat")])


def test_splits_without_references_give_predictions_to_submit(tmp_path, monkeypatch):
    """NoCaps test (images, no captions) and VQAv2 test-dev (questions, no answers): generation runs and the
    predictions come back unscored, instead of a score against empty references."""
    from PIL import Image

    from blip_train.data.schema import make_sample, write_split
    from blip_train.evaluation import generative_eval
    from tests.unit.test_data_images import encode

    image = encode(Image.new("RGB", (40, 40), (10, 200, 30)), "JPEG")
    write_split(tmp_path / "nocaps_test", [make_sample(image, image_id=i, dataset="nocaps", source="nocaps/in-domain")
                                           for i in range(3)])
    write_split(tmp_path / "testdev", [make_sample(image, image_id=i // 2, question=f"question {i}?", task="vqa",
                                                   question_id=100 + i) for i in range(4)])
    monkeypatch.setattr(generative_eval, "generate_texts",
                        lambda model, collate, tok, rows, *a, **k: {i: f"text {i}" for i in rows.indices})
    cfg = ExperimentConfig(model=tiny_model_config())
    metrics, preds = generative_eval.evaluate_captions(None, None, None, cfg, str(tmp_path / "nocaps_test"), {},
                                                       max_samples=0)
    assert metrics == {"num_images": 3, "num_references": 0}
    assert [(p["image_id"], p["prediction"]) for p in preds] == [(0, "text 0"), (1, "text 1"), (2, "text 2")]
    metrics, preds = generative_eval.evaluate_vqa(None, None, None, cfg, str(tmp_path / "testdev"), {}, max_samples=0)
    assert metrics == {"num_questions": 4, "num_images": 2}
    assert [(p["question_id"], p["prediction"]) for p in preds] == [(100 + i, f"text {i}") for i in range(4)]


def test_question_aware_stage2_is_not_exported_to_a_class_that_would_ignore_the_question(tmp_path):
    import yaml
    from safetensors.torch import save_file

    from blip_train.interop.hf_export import InteropError, export_hf

    save_file({"query_tokens": torch.zeros(1, 4, 32)}, str(tmp_path / "w.safetensors"))
    config = {"model": {"arch": "stage2", "qformer_text_input": True,
                        "llm": {"path": str(tmp_path / "llm"), "prompt": "Question: {} Answer:"}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(InteropError, match="model.qformer_text_input=true .* has no transformers class"):
        export_hf(tmp_path / "w.safetensors", tmp_path / "hf", config=str(tmp_path / "c.yaml"))
    assert not (tmp_path / "hf").exists()


def test_nocaps_val_is_scored_per_domain(tmp_path, monkeypatch):
    """Rows with a domain in `source` (convert_coco.py on NoCaps) get a CIDEr-D per domain, each on its own
    images, beside the overall score."""
    from PIL import Image

    from blip_train.data.schema import make_sample, write_split
    from blip_train.evaluation import generative_eval
    from blip_train.evaluation.caption_metrics import caption_metrics
    from tests.unit.test_data_images import encode

    image = encode(Image.new("RGB", (40, 40), (10, 200, 30)), "JPEG")
    caps = [["a dog on the grass", "a brown dog"], ["a red bus on a street", "a bus"], ["a cat on a sofa", "a cat"],
            ["a plate of food", "food on a plate"]]
    domains = ["in-domain", "out-domain", "in-domain", "out-domain"]
    write_split(tmp_path / "val", [make_sample(image, image_id=i, caption=c[0], captions=c, source=f"nocaps/{d}")
                                   for i, (c, d) in enumerate(zip(caps, domains))])
    guesses = {0: "a dog on the grass", 1: "a cat", 2: "a cat on a sofa", 3: "a bus"}
    monkeypatch.setattr(generative_eval, "generate_texts", lambda *a, **k: guesses)
    cfg = ExperimentConfig(model=tiny_model_config())
    metrics, preds = generative_eval.evaluate_captions(None, None, None, cfg, str(tmp_path / "val"), {}, max_samples=0)
    for domain, rows in (("in_domain", [0, 2]), ("out_domain", [1, 3])):
        want = caption_metrics({i: guesses[i] for i in rows}, {i: caps[i] for i in rows})["cider"]
        assert metrics[f"cider_{domain}"] == pytest.approx(100.0 * want)
    assert metrics["cider_in_domain"] > metrics["cider_out_domain"]  # right captions vs wrong ones
    assert [p["domain"] for p in preds] == domains
