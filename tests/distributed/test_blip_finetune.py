"""BLIP fine-tuning through the real trainer, from a BLIP pretraining checkpoint (model.init_from): the captioner
(model.objective=caption, prompt "a picture of ", at a larger image size than pretraining: the position
embeddings are interpolated), the retrieval model (model.objective=retrieval) and the VQA model
(model.objective=vqa, its answer decoder untied from the MED). What each objective does not
read stays frozen at the pretraining run's values; evaluation and export accept what the run trained and refuse
the rest in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import (assert_vqa_scores_are_earned, run_train, train_and_dump, trainable_weights,
                                    write_tiny_blip_config)

pytestmark = pytest.mark.dist
PROMPT = "a picture of "


@pytest.fixture(scope="module")
def pretrained(tiny_assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("blip_ft") / "pretrain"
    run_train(write_tiny_blip_config(tiny_assets, run, train={"max_steps": 2, "save_interval": 2}), nproc=1)
    return run


def _finetune_config(tiny_assets, run, pretrained, objective: str, image_size: int = 32, **text):
    return write_tiny_blip_config(
        tiny_assets, run, train={"max_steps": 2, "save_interval": 2}, data={"image_size": image_size},
        model={"objective": objective, "init_from": str(pretrained), "vision": {"image_size": image_size},
               "text": text})


def _eval(tiny_assets, run, task: str, *sets: str) -> subprocess.CompletedProcess:
    from tests.helpers.tiny_run import make_tiny_assets
    return _cli("-m", "blip_train.eval", "--task", task, "--checkpoint", str(run), "--data",
                str(make_tiny_assets(tiny_assets)["data"] / "val"), *[a for s in sets for a in ("--set", s)])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=600)


def _capfilt(tiny_assets, tmp_path, *args: str) -> subprocess.CompletedProcess:
    from tests.helpers.tiny_run import make_tiny_assets
    return _cli(str(REPO / "tools" / "capfilt.py"), "--data", str(make_tiny_assets(tiny_assets)["data"] / "val"),
                "--out", str(tmp_path / "capfilt"), *args)


def _loss_keys(run) -> set[str]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {k for r in rows for k in r if k.startswith("train/loss")}


def test_caption_finetuning_from_pretraining(tiny_assets, tmp_path, pretrained):
    run = tmp_path / "caption"
    config = _finetune_config(tiny_assets, run, pretrained, "caption", image_size=48, prompt=PROMPT)
    r = train_and_dump(config, tmp_path / "caption.pt")
    assert "init_from" in r.stdout and "momentum copies none" in r.stdout, r.stdout[-3000:]
    assert _loss_keys(run) == {"train/loss", "train/loss_lm"}
    live, before = torch.load(tmp_path / "caption.pt"), trainable_weights(pretrained, "step_0000002")
    # Frozen: what captioning never reads, exactly as pretraining left it; no momentum copies at all.
    assert live["frozen"] and not any("_m." in k for k in live["frozen"])
    for name, value in live["frozen"].items():
        assert ".self_attn." in name or name.split(".")[0] in ("vision_proj", "text_proj", "itm_head", "temp"), name
        assert torch.equal(value, before[name].to(value.dtype)), name
    grid = live["trainable"]["visual_encoder.pos_embed"].shape[1]
    assert grid == 1 + (48 // 8) ** 2 and before["visual_encoder.pos_embed"].shape[1] == 1 + (32 // 8) ** 2

    e = _eval(tiny_assets, run, "caption")
    assert e.returncode == 0, e.stdout[-2000:] + e.stderr[-3000:]
    assert "cider" in json.loads(e.stdout.strip().splitlines()[-1])
    refused = _eval(tiny_assets, run, "retrieval")
    assert refused.returncode == 2 and "does not train the ITC / ITM heads" in refused.stderr, refused.stderr[-2000:]
    x = _cli(str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run), "--out", str(tmp_path / "hf"),
             "--hf-class", "BlipForImageTextRetrieval")
    assert x.returncode == 2 and len(x.stderr.strip().splitlines()) == 1, x.stderr[-2000:]  # refused before merging
    assert "export it with --hf-class BlipForConditionalGeneration" in x.stderr
    x = _cli(str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run), "--out", str(tmp_path / "hf"),
             "--hf-class", "BlipForConditionalGeneration")  # the temperature did not train: the config keeps 0.07
    assert x.returncode == 0 and json.loads(x.stdout.strip().splitlines()[-1])["class"] == \
        "BlipForConditionalGeneration", x.stderr[-2000:]
    c = _capfilt(tiny_assets, tmp_path, "--checkpoint", str(run))  # a captioner cannot be the filter
    assert c.returncode == 2 and "does not train the ITC/ITM heads" in c.stderr, c.stderr[-2000:]


def test_retrieval_finetuning_from_pretraining(tiny_assets, tmp_path, pretrained):
    run = tmp_path / "retrieval"
    config = _finetune_config(tiny_assets, run, pretrained, "retrieval")
    r = train_and_dump(config, tmp_path / "retrieval.pt")
    assert "momentum copies loaded" in r.stdout or "momentum copies copied" in r.stdout, r.stdout[-3000:]
    assert _loss_keys(run) == {"train/loss", "train/loss_itc", "train/loss_itm"}
    live, before = torch.load(tmp_path / "retrieval.pt"), trainable_weights(pretrained, "step_0000002")
    frozen = {k for k in live["frozen"] if "_m." not in k}
    assert frozen and all(".self_attn_dec." in k or k.startswith("text.lm_head.") for k in frozen), frozen
    assert all(torch.equal(live["frozen"][k], before[k].to(live["frozen"][k].dtype)) for k in frozen)

    e = _eval(tiny_assets, run, "retrieval")
    assert e.returncode == 0, e.stdout[-2000:] + e.stderr[-3000:]
    assert "txt_r1" in json.loads(e.stdout.strip().splitlines()[-1])
    refused = _eval(tiny_assets, run, "caption")
    assert refused.returncode == 2 and "does not train the caption decoder" in refused.stderr, refused.stderr[-2000:]
    for args in (("--checkpoint", str(run)), ("--checkpoint", str(pretrained), "--captioner", str(run))):
        c = _capfilt(tiny_assets, tmp_path, *args)  # a retrieval run is a filter, never the captioner
        assert c.returncode == 2 and "does not train the decoder" in c.stderr, c.stderr[-2000:]


def test_vqa_finetuning_from_pretraining(tiny_assets, tmp_path, pretrained):
    run = tmp_path / "vqa"
    config = _finetune_config(tiny_assets, run, pretrained, "vqa")
    r = train_and_dump(config, tmp_path / "vqa.pt", "deepspeed.zero_stage=3")
    assert "VQA answer decoder from the MED: text_decoder" in r.stdout, r.stdout[-3000:]
    assert _loss_keys(run) == {"train/loss", "train/loss_vqa"}
    live, before = torch.load(tmp_path / "vqa.pt"), trainable_weights(pretrained, "step_0000002")
    # The answer decoder started as the pretrained MED and trained apart from it (untied).
    dec, enc = "text_decoder.layers.0.cross_attn.query.weight", "text.layers.0.cross_attn.query.weight"
    assert dec in live["trainable"] and enc in live["trainable"]
    assert not torch.equal(live["trainable"][dec], live["trainable"][enc])
    frozen = set(live["frozen"])
    assert "text_decoder.layers.0.self_attn.query.weight" in frozen and "text.layers.0.self_attn_dec.query.weight" in frozen
    assert torch.equal(live["frozen"]["text_decoder.layers.0.self_attn.query.weight"],
                       before["text.layers.0.self_attn.query.weight"].to(torch.float32))
    assert not any("_m." in k for k in frozen)

    generated = _eval(tiny_assets, run, "vqa")
    assert generated.returncode == 0, generated.stdout[-2000:] + generated.stderr[-3000:]
    metrics = json.loads(generated.stdout.strip().splitlines()[-1])
    assert_vqa_scores_are_earned(metrics)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["red", "blue", "two", "t-shirt", "a circle"]))
    ranked = _eval(tiny_assets, run, "vqa", f"eval.answer_list={answers}", "eval.k_test=3")
    assert ranked.returncode == 0, ranked.stdout[-2000:] + ranked.stderr[-3000:]
    predictions = json.loads((run / "eval" / "vqa_val.json").read_text())["predictions"]
    assert {p["prediction"] for p in predictions} <= {"red", "blue", "two", "t-shirt", "a circle"}
    answers.write_text(json.dumps({"red": 1}))
    bad = _eval(tiny_assets, run, "vqa", f"eval.answer_list={answers}")
    assert bad.returncode == 2 and "eval.answer_list" in bad.stderr and "JSON list" in bad.stderr, bad.stderr[-2000:]
    for task in ("caption", "retrieval"):
        refused = _eval(tiny_assets, run, task)
        assert refused.returncode == 2 and "model.objective=vqa run does not train" in refused.stderr, \
            refused.stderr[-2000:]
    x = _cli(str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run), "--out", str(tmp_path / "hf"),
             "--hf-class", "BlipForConditionalGeneration")
    assert x.returncode == 2 and "export it with --hf-class BlipForQuestionAnswering" in x.stderr, x.stderr[-2000:]
    x = _cli(str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert x.returncode == 0, x.stderr[-2000:]  # without --hf-class: the objective's class
    assert json.loads(x.stdout.strip().splitlines()[-1])["class"] == "BlipForQuestionAnswering"
    c = _capfilt(tiny_assets, tmp_path, "--checkpoint", str(run))
    assert c.returncode == 2 and "does not train the ITC/ITM heads" in c.stderr, c.stderr[-2000:]
