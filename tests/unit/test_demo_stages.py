"""The demo's stage list: the fine-tuning stages, what they start from and read, and their attribute score."""
from __future__ import annotations

import json

from blip_train.config import load_config
from blip_train.demo.stages import FINETUNE, GENERATIVE, MODALITIES, RETRIEVAL, VQA_FINETUNE, stripes_named


def test_fine_tuning_stages_train_the_vit_from_an_earlier_demo_stage_on_their_own_split():
    earlier = ["stage1", *GENERATIVE]
    for name, (recipe, start, task, _, label) in FINETUNE.items():
        cfg = load_config(recipe)
        assert start in earlier and cfg.model.init_from == f"runs/demo/{start}"
        assert not cfg.model.vision.frozen and cfg.optim.layer_decay < 1
        assert cfg.deepspeed.zero_stage == 3 and cfg.run.output_dir == f"runs/demo/{name}"
        assert [s.local for s in cfg.data.train] == ["runs/demo/data_ft/train"] and cfg.data.val == "runs/demo/data_ft/val"
        assert "striped" in label and task in ("caption", "retrieval")
        # the model it starts from: same towers and Q-Former as the earlier stage's recipe
        before = load_config(f"demo/{start}").model
        assert (cfg.model.vision.weights, cfg.model.vision.width, cfg.model.qformer) == \
            (before.vision.weights, before.vision.width, before.qformer)


def test_retrieval_stages_cover_blip2_stage1_blip_and_albef():
    """Every ITC/ITM-trained family is a demo stage, on the demo's data, with ZeRO (stage 1: ZeRO-3; BLIP and ALBEF:
    ZeRO-2, their ZeRO-3 momentum path is tested on 2 ranks elsewhere); BLIP and ALBEF train their ViT from the
    demo's pretrained tower with a queue the 2-rank global batch fills in whole steps."""
    archs = {}
    for name, (recipe, _) in RETRIEVAL.items():
        cfg = load_config(recipe)
        archs[name] = cfg.model.arch
        assert cfg.run.output_dir == f"runs/demo/{name}"
        assert cfg.deepspeed.zero_stage == (3 if cfg.model.arch == "stage1" else 2)
        assert cfg.model.vision.weights == "runs/demo/assets/vit.safetensors"
        if cfg.model.arch in ("blip", "albef"):
            assert not cfg.model.vision.frozen
            assert cfg.model.momentum.queue_size % (2 * cfg.train.micro_batch_size) == 0
    assert archs == {"stage1": "stage1", "blip": "blip", "albef": "albef"}


def test_blip_vqa_stage_fine_tunes_the_demo_blip_run():
    """BLIP's VQA objective from the demo's BLIP stage: the same ViT and MED sizes (init_from loads them
    strictly), ranked over the answer list the demo writes."""
    for name, (recipe, start) in VQA_FINETUNE.items():
        cfg, before = load_config(recipe), load_config(f"demo/{start}")
        assert start in RETRIEVAL and cfg.model.init_from == f"runs/demo/{start}"
        assert (cfg.model.arch, cfg.model.objective) == ("blip", "vqa") and cfg.run.output_dir == f"runs/demo/{name}"
        assert (cfg.model.vision, cfg.model.text) == (before.model.vision, before.model.text)
        assert cfg.eval.answer_list == "runs/demo/assets/answer_list.json" and cfg.data.val == before.data.val


def test_modality_stages_read_their_own_split_and_encoder():
    """The audio and 3D stages train on the tones / solids the demo writes, through the frozen encoder folder it
    writes (named by the key the stage overrides), with their cue and LoRA on the demo's tiny OPT (it never saw
    their words); nothing comes from the image stages."""
    expected = {"audio_caption": ("audio", "audio: ", "caption", "stage2"), "3d_qa": ("3d", "3d: ", "vqa", "instruct")}
    assert set(MODALITIES) == set(expected)
    for name, (recipe, folder, task, _, _, encoder_key, encoder) in MODALITIES.items():
        cfg = load_config(recipe)
        assert (cfg.model.modality, cfg.model.modality_prefix, task, cfg.model.arch) == expected[name]
        section = cfg.model.audio if encoder_key == "model.audio.encoder" else cfg.model.points
        assert section.encoder == f"runs/demo/assets/{encoder}" and not cfg.model.init_from
        assert cfg.data.train[0].local == f"runs/demo/{folder}/train" and cfg.data.val == f"runs/demo/{folder}/val"
        assert cfg.model.llm.path == "runs/demo/assets/opt" and cfg.model.llm.lora.r > 0
        assert cfg.run.output_dir == f"runs/demo/{name}" and cfg.deepspeed.zero_stage == 3


def test_stripes_named_scores_the_attribute(tmp_path):
    rows = [{"prediction": "a striped red circle on the left", "references": ["a striped red circle on the left"]},
            {"prediction": "a red circle on the left", "references": ["a striped red circle at the left"]},
            {"prediction": "a blue square", "references": ["a blue square in the center"]},
            {"prediction": "a striped blue square", "references": ["a blue square in the middle"]}]
    f = tmp_path / "caption_val.json"
    f.write_text(json.dumps({"metrics": {}, "predictions": rows}))
    assert stripes_named(f) == {"agreement": 50.0, "striped_images": 50.0, "captions_saying_striped": 50.0}



def test_prepare_puts_a_relative_out_under_the_callers_folder(tmp_path, monkeypatch):
    """`python -m blip_train.demo --prepare` run outside the repository: the data the recipes read (runs/demo/...
    relative to where `train` runs) lands under the caller's folder, where the parent process looks for it too
    (the dataset tools run from the repository, and wrote a relative --out there)."""
    from blip_train.demo import __main__ as demo

    seen = {}
    # The assets' pretraining takes minutes and does not depend on where the data went: record its inputs only.
    monkeypatch.setattr(demo, "make_assets", lambda out, data, image_size: seen.update(out=out, data=data) or {})
    monkeypatch.setattr(demo, "make_points_data", lambda out: seen.update(points=out))
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--prepare", "--out", "rel/demo", "--num-samples", "40"]) == 0
    for split in ("data/train", "data/val", "data_ft/train", "data_ft/val"):
        assert (tmp_path / "rel/demo" / split / "index.json").is_file(), split
    assert seen == {"out": tmp_path / "rel/demo", "data": tmp_path / "rel/demo/data", "points": tmp_path / "rel/demo"}


def test_exact_captions_and_the_majority_caption(tmp_path):
    from blip_train.demo.stages import exact_captions, majority_caption_share

    rows = [{"prediction": "a loud high beeping.", "references": ["a loud high beeping"]},
            {"prediction": "a loud high beeping", "references": ["a quiet high beeping"]},
            {"prediction": "a quiet steady low tone", "references": ["a quiet steady low tone"]},
            {"prediction": "a loud low tone", "references": ["a loud high beeping"]}]
    (tmp_path / "p.json").write_text(json.dumps({"predictions": rows}))
    assert exact_captions(tmp_path / "p.json") == 50.0
    assert majority_caption_share(tmp_path / "p.json") == 50.0


def test_question_accuracy_and_its_majority_answer(tmp_path):
    from blip_train.demo.stages import question_accuracy

    rows = [{"question": "what shape is this?", "prediction": "Cube.", "answers": ["cube"] * 10},
            {"question": "what shape is this?", "prediction": "cube", "answers": ["cone"] * 10},
            {"question": "what shape is this?", "prediction": "torus", "answers": ["torus"] * 10},
            {"question": "what shape is this?", "prediction": "cube", "answers": ["cone"] * 10},
            {"question": "what color is it?", "prediction": "red", "answers": ["red"] * 10}]
    (tmp_path / "p.json").write_text(json.dumps({"predictions": rows}))
    assert question_accuracy(tmp_path / "p.json", "what shape is this?") == (50.0, 50.0)
