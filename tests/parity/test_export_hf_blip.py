"""BLIP (model.arch=blip) through tools/export_hf.py and tools/import_hf.py on a real checkpoint of the trainer
(2 ranks, ZeRO-3, one step): transformers' BlipForImageTextRetrieval, BlipForConditionalGeneration and
BlipForQuestionAnswering load each exported folder with no missing or unexpected keys and give our outputs
(fp32, <= 1e-5): ITM logits ([ENC]-first text), ITC cosine similarities ([CLS]-first), the decoder's LM logits
([DEC]-first) and the VQA answer loss; import(export(run)) gives back the run's trainable weights bit for bit,
and model.init_from loads the import through build_blip_model. A VQA fine-tuning run (model.objective=vqa, its own
answer decoder) exports to BlipForQuestionAnswering with the same answer loss and the answers transformers'
generate() writes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import run_train, write_tiny_blip_config

pytestmark = pytest.mark.parity
ATOL = 1e-5
CLASSES = ("BlipForImageTextRetrieval", "BlipForConditionalGeneration", "BlipForQuestionAnswering")
TEXTS = ["a red square on a blue field", "two green circles"]


def tool(name: str, *args: str) -> dict:
    """Run tools/<name> as a user would; returns the JSON summary on its last line."""
    r = subprocess.run([sys.executable, str(REPO / "tools" / name), *args], capture_output=True, text=True,
                       env=clean_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory) -> dict:
    """A finished one-step BLIP run and its exports, one folder per class."""
    from blip_train.config import load_config

    root = tmp_path_factory.mktemp("blip_export")
    config = write_tiny_blip_config(tiny_assets, root / "run", train={"max_steps": 1, "save_interval": 1})
    run_train(config)
    exports = {}
    for name in CLASSES:
        exports[name] = root / name
        summary = tool("export_hf.py", "--checkpoint", str(root / "run"), "--out", str(exports[name]),
                       "--hf-class", name)
        assert summary["class"] == name and summary["arch"] == "blip"
    return {"root": root, "run": root / "run", "cfg": load_config(str(config)), "exports": exports}


@pytest.fixture(scope="module")
def ours(run):
    from blip_train.training.stages import load_trained_retrieval_model

    model, tokenizer = load_trained_retrieval_model(run["cfg"], run["run"] / "checkpoints", "step_0000001")
    return model.eval(), tokenizer


def load_hf(folder: Path):
    import transformers

    name = transformers.AutoConfig.from_pretrained(folder).architectures[0]
    model, info = getattr(transformers, name).from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def processed(folder: Path) -> dict:
    """The saved BlipProcessor's inputs: [CLS]-first text (one padded), images at model.vision.image_size."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    assert type(processor).__name__ == "BlipProcessor"
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8))
              for i in range(2)]
    inputs = processor(images=images, text=TEXTS, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 32 and (inputs["attention_mask"][1] == 0).any()
    return inputs


def with_first(ids: torch.Tensor, token: int) -> torch.Tensor:
    out = ids.clone()
    out[:, 0] = token
    return out


def test_retrieval_export_gives_our_itm_logits_and_itc_similarities(run, ours):
    model, tok = ours
    folder = run["exports"]["BlipForImageTextRetrieval"]
    hf, inputs = load_hf(folder), processed(folder)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    assert (ids[:, 0] == tok.cls_token_id).all()
    enc = with_first(ids, tok.convert_tokens_to_ids("[ENC]"))  # transformers keeps input_ids[:, 0] as given
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(pixels)
        want_itm = model.itm_head(model.text(enc, mask, image_embeds=image_embeds, mode="multimodal")[:, 0])
        want_sim = image_feat[:, 0] @ model.encode_text(ids, mask).t()  # (B_img, B_txt) cosine similarities
        got_itm = hf(input_ids=enc, attention_mask=mask, pixel_values=pixels, use_itm_head=True).itm_score
        got_sim = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False).itm_score
    assert (got_itm - want_itm).abs().max() <= ATOL
    assert (got_sim - want_sim).abs().max() <= ATOL
    assert torch.allclose(got_itm[:, 1], model.itm_scores(image_embeds, ids, mask), atol=ATOL)  # eval's score
    assert hf.config.logit_scale_init_value == pytest.approx(-torch.log(model.temp).item())


def test_captioning_export_gives_our_lm_logits(run, ours):
    model, tok = ours
    folder = run["exports"]["BlipForConditionalGeneration"]
    hf, inputs = load_hf(folder), processed(folder)
    assert hf.config.text_config.bos_token_id == tok.convert_tokens_to_ids("[DEC]") == tok.bos_token_id
    assert hf.config.text_config.sep_token_id == tok.sep_token_id and hf.config.text_config.label_smoothing == 0.1
    dec = with_first(inputs["input_ids"], tok.bos_token_id)
    mask, pixels = inputs["attention_mask"], inputs["pixel_values"]
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixels)
        want = model.text.lm_logits(model.text(dec, mask, image_embeds=image_embeds, mode="decoder"))
        got = hf(pixel_values=pixels, input_ids=dec, attention_mask=mask).logits
    assert got.shape == want.shape and (got - want).abs().max() <= ATOL
    # The decoder's tied LM head is written out: the word embeddings again, not a separate matrix.
    assert torch.equal(hf.text_decoder.cls.predictions.decoder.weight, model.text.embeddings.word_embeddings.weight)
    with torch.no_grad():  # transformers' own captioning entry runs on the folder as saved
        caption = hf.generate(pixel_values=pixels, max_new_tokens=4)
    assert caption.shape[0] == 2 and (caption[:, 0] == tok.bos_token_id).all()
    # The run's decoding defaults reach the decoder that generate() hands over to.
    e = run["cfg"].eval
    gen = hf.text_decoder.generation_config
    assert (gen.num_beams, gen.max_new_tokens, gen.min_new_tokens) == (e.num_beams, e.max_new_tokens, e.min_new_tokens)
    with torch.no_grad():
        assert hf.generate(pixel_values=pixels).shape[1] <= 1 + e.max_new_tokens


@pytest.mark.parametrize("beams,length_penalty,sep_bias", [(1, 1.0, 0.0), (3, 1.0, 0.0), (4, 0.0, 0.0), (3, 1.0, 2.5),
                                                           (3, 2.0, 2.5)])
def test_captions_decode_as_transformers_generate_does(run, ours, beams, length_penalty, sep_bias):
    """Greedy and beam-search captions after [DEC] + a prompt: the tokens transformers' generate() writes with the
    exported BlipForConditionalGeneration (its beam rules: length penalty, min_new_tokens, finished hypotheses).
    sep_bias raises [SEP]'s logit in both models, so hypotheses also end before the last step."""
    import copy

    model, tok = ours
    folder = run["exports"]["BlipForConditionalGeneration"]
    hf, pixels = load_hf(folder), processed(folder)["pixel_values"]
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.text.lm_head.decoder.bias[tok.sep_token_id] += sep_bias
        hf.text_decoder.cls.predictions.bias[tok.sep_token_id] += sep_bias
    prompt = torch.tensor([[tok.bos_token_id, *tok("a picture of", add_special_tokens=False).input_ids]] * 2)
    kw = {"max_new_tokens": 8, "min_new_tokens": 3, "num_beams": beams, "length_penalty": length_penalty}
    with torch.no_grad():
        ours_ids = model.generate(pixels, prompt, **kw)  # (2, 8)
        # transformers' BLIP drops the last token of input_ids (the processor's [SEP]) and returns the prompt too.
        sep = torch.full((2, 1), tok.sep_token_id)
        theirs = hf.generate(pixel_values=pixels, input_ids=torch.cat([prompt, sep], 1), **kw)[:, prompt.shape[1]:]
    theirs = torch.cat([theirs, torch.full((2, 8 - theirs.shape[1]), tok.pad_token_id)], 1)
    assert torch.equal(ours_ids, theirs), (ours_ids, theirs)


def test_vqa_export_gives_our_answer_loss(run, ours):
    """The question through the image-grounded encoder ([ENC] first), the answer through the decoder attending to
    it: transformers returns no logits here, so the LM loss (label smoothing 0.1, as ours) is compared."""
    from blip_train.models.blip_losses import lm_loss

    model, tok = ours
    folder = run["exports"]["BlipForQuestionAnswering"]
    hf, inputs = load_hf(folder), processed(folder)
    # Unpadded questions: transformers' BLIP cross-attention ignores encoder_attention_mask (4.57).
    question = with_first(inputs["input_ids"][:, :4], tok.convert_tokens_to_ids("[ENC]"))
    qmask = torch.ones_like(question)
    answer, amask = with_first(inputs["input_ids"], tok.bos_token_id), inputs["attention_mask"]
    labels = answer.masked_fill(amask == 0, -100)
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixels)
        q = model.text(question, qmask, image_embeds=image_embeds, mode="multimodal")
        want = lm_loss(model.text.lm_logits(model.text(answer, amask, image_embeds=q, mode="decoder")), labels)
        got = hf(input_ids=question, attention_mask=qmask, pixel_values=pixels, decoder_input_ids=answer,
                 decoder_attention_mask=amask, labels=labels).loss
    assert (got - want).abs() <= ATOL


def test_import_of_the_exports_is_the_run_and_inits_a_model(run, ours, tmp_path):
    from blip_train.config import config_from_dict
    from blip_train.interop.weights_io import read_weights
    from blip_train.training.stages import build_blip_model

    model, _ = ours
    exports = run["exports"]
    summary = tool("import_hf.py", "--hf", str(exports["BlipForImageTextRetrieval"]), "--decoder",
                   str(exports["BlipForConditionalGeneration"]), "--out", str(tmp_path / "ours"))
    assert summary["arch"] == "blip"
    weights, meta = read_weights(tmp_path / "ours")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert weights.keys() == trainable.keys()
    for k, v in trainable.items():
        assert weights[k].dtype == v.dtype and torch.equal(weights[k], v), k

    # The config snippet + model.init_from rebuild exactly these weights; the momentum copies follow them.
    snippet = json.loads(json.dumps(meta["config"]))
    cfg = run["cfg"]
    m = replace(cfg.model, init_from=str(tmp_path / "ours"))
    report: dict = {}
    built, _ = build_blip_model(replace(cfg, model=m), report=report)
    assert report == {"kept": [], "decoder_from_encoder": [], "answer_decoder": [], "momentum": "copied",
                      "queue": "initial"}
    state = dict(built.named_parameters())
    assert all(torch.equal(state[k], v) for k, v in trainable.items())
    assert all(torch.equal(p, mom) for p, mom in built.momentum_pairs())
    sizes = config_from_dict({"model": snippet["model"]}).model
    assert (sizes.text.layers, sizes.vision.width, sizes.embed_dim) == (m.text.layers, m.vision.width, m.embed_dim)

    # export(import(export)) == export, tensor for tensor (the import carries its config and tokenizer).
    from blip_train.interop.hf_export import export_hf
    from blip_train.models.hf_names import read_hf_folder_weights

    for name in ("BlipForImageTextRetrieval", "BlipForConditionalGeneration"):
        export_hf(tmp_path / "ours", tmp_path / name, hf_class_name=name)
        a, b = read_hf_folder_weights(exports[name]), read_hf_folder_weights(tmp_path / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_retrieval_import_alone_starts_the_decoder_from_the_encoder(run, ours, tmp_path):
    from blip_train.training.stages import build_blip_model

    model, _ = ours
    out = tmp_path / "itm_only"
    tool("import_hf.py", "--hf", str(run["exports"]["BlipForImageTextRetrieval"]), "--out", str(out))
    cfg = run["cfg"]
    report: dict = {}
    built, _ = build_blip_model(replace(cfg, model=replace(cfg.model, init_from=str(out))), report=report)
    assert report["kept"] and all(k.startswith("text.lm_head.") for k in report["kept"])
    assert report["decoder_from_encoder"] and all(".self_attn_dec." in k for k in report["decoder_from_encoder"])
    state = dict(built.named_parameters())
    for k in report["decoder_from_encoder"]:
        assert torch.equal(state[k], state[k.replace(".self_attn_dec.", ".self_attn.")])
    assert torch.equal(state["text.layers.0.cross_attn.query.weight"], model.text.layers[0].cross_attn.query.weight)


def test_export_refuses_albef_and_unknown_classes(run, tmp_path):
    from blip_train.interop.hf_export import export_hf
    from blip_train.interop.weights_io import InteropError

    with pytest.raises(InteropError, match="BlipForImageTextRetrieval"):
        export_hf(run["run"], tmp_path / "x", hf_class_name="Blip2ForImageTextRetrieval")
    with pytest.raises(InteropError, match="ALBEF"):
        export_hf(run["run"], tmp_path / "y", overrides=["model.arch=albef", "model.text.decoder=false",
                                                         "model.text.fusion_layer=1"])


def test_import_refuses_the_wrong_blip_folders(run, tmp_path):
    from blip_train.interop.hf_import import import_hf
    from blip_train.interop.weights_io import InteropError

    exports = run["exports"]
    with pytest.raises(InteropError, match="expected a BlipForImageTextRetrieval folder") as e:
        import_hf(exports["BlipForConditionalGeneration"], tmp_path / "a")
    assert "\n" not in str(e.value)
    with pytest.raises(InteropError, match="expected a BlipForConditionalGeneration folder"):
        import_hf(exports["BlipForImageTextRetrieval"], tmp_path / "b", decoder=exports["BlipForQuestionAnswering"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def vqa_run(run, tiny_assets):
    """A one-step VQA fine-tuning of the pretraining run (2 ranks, ZeRO-3) and its BlipForQuestionAnswering export."""
    from blip_train.config import load_config
    from blip_train.training.stages import build_blip_model
    from blip_train.training.weights import consolidate_trainable, load_trainable_

    root = run["root"]
    config = write_tiny_blip_config(tiny_assets, root / "vqa", train={"max_steps": 1, "save_interval": 1},
                                    model={"objective": "vqa", "init_from": str(run["run"])})
    run_train(config)
    tool("export_hf.py", "--checkpoint", str(root / "vqa"), "--out", str(root / "vqa_hf"),
         "--hf-class", "BlipForQuestionAnswering")
    cfg = load_config(str(config))
    model, tok = build_blip_model(replace(cfg, model=replace(cfg.model, init_from="")))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    load_trainable_(model, consolidate_trainable(root / "vqa" / "checkpoints", "step_0000001", names))
    return {"model": model.eval(), "tok": tok, "hf": load_hf(root / "vqa_hf"), "inputs": processed(root / "vqa_hf"),
            "cfg": cfg, "folder": root / "vqa_hf"}


def test_vqa_run_export_gives_its_answer_loss_and_answers(vqa_run):
    model, tok, hf, inputs = (vqa_run[k] for k in ("model", "tok", "hf", "inputs"))
    question = with_first(inputs["input_ids"][:, :4], tok.convert_tokens_to_ids("[ENC]"))  # unpadded (see above)
    qmask = torch.ones_like(question)
    answer, amask = with_first(inputs["input_ids"], tok.bos_token_id), inputs["attention_mask"]
    labels, pixels = answer.masked_fill(amask == 0, -100), inputs["pixel_values"]
    from blip_train.models.blip_losses import lm_loss

    with torch.no_grad():
        q = model.text(question, qmask, image_embeds=model.visual_encoder(pixels), mode="multimodal")
        hidden = model.text_decoder(answer, amask, image_embeds=q, image_mask=qmask, mode="decoder")
        want = lm_loss(model.text_decoder.lm_logits(hidden), labels)
        got = hf(input_ids=question, attention_mask=qmask, pixel_values=pixels, decoder_input_ids=answer,
                 decoder_attention_mask=amask, labels=labels).loss
    assert (got - want).abs() <= ATOL
    # Not the pretraining MED's decoder view: the run's own answer decoder went to text_decoder.
    assert torch.equal(hf.text_decoder.bert.encoder.layer[0].attention.self.query.weight,
                       model.text_decoder.layers[0].self_attn_dec.query.weight)
    for beams in (1, 3):
        kw = {"max_new_tokens": 5, "min_new_tokens": 1, "num_beams": beams, "length_penalty": 1.0}
        with torch.no_grad():
            ours_ids = model.generate(pixels, question_ids=question, question_mask=qmask, **kw)  # (2, 5)
            theirs = hf.generate(input_ids=question, attention_mask=qmask, pixel_values=pixels, **kw)[:, 1:]
        theirs = torch.cat([theirs, torch.full((2, 5 - theirs.shape[1]), tok.pad_token_id)], 1)
        assert torch.equal(ours_ids, theirs), (beams, ours_ids, theirs)


def test_vqa_import_is_the_run_and_inits_a_vqa_model(vqa_run, tmp_path):
    """tools/import_hf.py on a BlipForQuestionAnswering folder: the question encoder and answer decoder of a
    model.objective=vqa run, which model.init_from loads (no copy of the MED into the answer decoder)."""
    from blip_train.training.stages import build_blip_model

    summary = tool("import_hf.py", "--hf", str(vqa_run["folder"]), "--out", str(tmp_path / "ours"))
    assert summary["class"] == "BlipForQuestionAnswering"
    snippet = yaml.safe_load((tmp_path / "ours" / "config_snippet.yaml").read_text())["model"]
    assert snippet["objective"] == "vqa"
    cfg = vqa_run["cfg"]
    report: dict = {}
    built, _ = build_blip_model(replace(cfg, model=replace(cfg.model, init_from=str(tmp_path / "ours"))),
                                report=report)
    got = dict(built.named_parameters())
    assert report["answer_decoder"] == [] and all(not got[k].requires_grad for k in report["kept"])
    for k, p in vqa_run["model"].named_parameters():
        if p.requires_grad:
            assert torch.equal(got[k], p), k
