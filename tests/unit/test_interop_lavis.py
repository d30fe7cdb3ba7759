"""LAVIS checkpoints and EVA ViT weights import exactly into our names.

The LAVIS state dicts are written here key by key with LAVIS's documented names (Blip2Qformer /
Blip2OPT / Blip2T5Instruct: `Qformer.bert.encoder.layer.{i}.attention.self.query`, `...crossattention...`,
`intermediate_query`, `output_query`, `Qformer.cls.predictions.*`, 0-dim `temp`, `opt_proj`, `t5_proj`,
the frozen `opt_model` / `t5_model`) from a model of ours with distinct random weights; importing them
must give back exactly that model's trainable tensors, which init_from then loads.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from blip_train.interop.lavis import import_eva_vit, import_lavis
from blip_train.interop.weights_io import InteropError, read_weights
from tests.helpers.tiny import tiny_model_config
from tests.parity.test_export_hf_models import perturb_
from tests.unit.test_llm_bridge import tiny_llm_config


def lavis_qformer(sd: dict, text_branch: bool, lm_head: bool) -> dict:
    """Our `qformer.*` tensors under LAVIS's BERT names (`Qformer.` + BertLMHeadModel)."""
    q = {k[len("qformer."):]: v for k, v in sd.items() if k.startswith("qformer.")}
    bert, out = "Qformer.bert.", {}
    emb = {"norm": "LayerNorm"} | ({"word_embeddings": "word_embeddings", "position_embeddings": "position_embeddings"}
                                   if text_branch else {})
    for ours, theirs in emb.items():
        for p in ("weight", "bias"):
            if f"embeddings.{ours}.{p}" in q:
                out[f"{bert}embeddings.{theirs}.{p}"] = q[f"embeddings.{ours}.{p}"]
    out[f"{bert}embeddings.position_ids"] = torch.arange(64)[None]  # a buffer LAVIS saves
    layers = 1 + max(int(k.split(".")[1]) for k in q if k.startswith("layers."))
    for i in range(layers):
        lay = f"{bert}encoder.layer.{i}."
        for ours, theirs in (("self_attn", "attention"), ("cross_attn", "crossattention")):
            if f"layers.{i}.{ours}.query.weight" not in q:
                continue
            for p in ("weight", "bias"):
                for proj in ("query", "key", "value"):
                    out[f"{lay}{theirs}.self.{proj}.{p}"] = q[f"layers.{i}.{ours}.{proj}.{p}"]
                out[f"{lay}{theirs}.output.dense.{p}"] = q[f"layers.{i}.{ours}.out.{p}"]
                out[f"{lay}{theirs}.output.LayerNorm.{p}"] = q[f"layers.{i}.{ours}.norm.{p}"]
        for ours, suffix in (("ffn_query", "_query"),) + ((("ffn", ""),) if text_branch else ()):
            for p in ("weight", "bias"):
                out[f"{lay}intermediate{suffix}.dense.{p}"] = q[f"layers.{i}.{ours}.fc1.{p}"]
                out[f"{lay}output{suffix}.dense.{p}"] = q[f"layers.{i}.{ours}.fc2.{p}"]
                out[f"{lay}output{suffix}.LayerNorm.{p}"] = q[f"layers.{i}.{ours}.norm.{p}"]
    if lm_head:
        cls = "Qformer.cls.predictions."
        for p in ("weight", "bias"):
            out[f"{cls}transform.dense.{p}"] = q[f"lm_head.dense.{p}"]
            out[f"{cls}transform.LayerNorm.{p}"] = q[f"lm_head.norm.{p}"]
        out[f"{cls}decoder.weight"] = q["embeddings.word_embeddings.weight"]  # tied in BERT
        out[f"{cls}bias"] = out[f"{cls}decoder.bias"] = q["lm_head.decoder.bias"]
    return out


def trained(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_stage1_checkpoint_imports_exactly(tmp_path):
    from blip_train.models.stage1 import Blip2Stage1
    from blip_train.training.weights import init_stage1_from_

    torch.manual_seed(0)
    model = Blip2Stage1(tiny_model_config(), device_type="cpu")
    perturb_(model, seed=1)
    sd = model.state_dict()
    lavis = {k: v for k, v in sd.items()
             if k.startswith(("visual_encoder.", "ln_vision.", "vision_proj.", "text_proj.", "itm_head."))}
    lavis.update(lavis_qformer(sd, text_branch=True, lm_head=True), query_tokens=sd["query_tokens"],
                 temp=sd["temp"].reshape(()))
    torch.save({"model": lavis, "epoch": 9}, tmp_path / "blip2_stage1.pth")  # as LAVIS's runner saves
    summary = import_lavis(tmp_path / "blip2_stage1.pth", tmp_path / "out")
    assert summary["arch"] == "stage1" and summary["left_out"] == 0
    weights, meta = read_weights(tmp_path / "out")
    assert_same(weights, trained(model))
    assert meta["arch"] == "stage1" and meta["config"] is None
    vit = load_file(str(tmp_path / "out" / "vision.safetensors"))
    assert_same(vit, {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")})

    torch.manual_seed(5)
    fresh = Blip2Stage1(tiny_model_config(), device_type="cpu")
    assert init_stage1_from_(fresh, tmp_path / "out") == []
    assert_same(trained(fresh), trained(model))


@pytest.mark.parametrize("arch,kind,proj", [("stage2", "opt", "opt"), ("instruct", "t5", "t5")])
def test_llm_stage_checkpoints_import_exactly(arch, kind, proj, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from blip_train.models.llm_bridge import Blip2LLM, init_from_earlier_stage_

    def build(seed: int) -> Blip2LLM:
        torch.manual_seed(seed)
        cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
        return Blip2LLM(tiny_model_config(arch=arch), cls.from_config(tiny_llm_config(kind)), device_type="cpu")

    model = build(0)
    perturb_(model, seed=2)
    sd = model.state_dict()
    # LAVIS stage 2 drops the Q-Former's text branch and LM head; InstructBLIP drops the LM head only.
    lavis = {k: v for k, v in sd.items() if k.startswith("ln_vision.")}
    lavis.update(lavis_qformer(sd, text_branch=arch == "instruct", lm_head=False), query_tokens=sd["query_tokens"])
    lavis.update({f"{proj}_proj.{p}": sd[f"llm_proj.{p}"] for p in ("weight", "bias")})
    lavis.update({f"{proj}_model.{k[len('llm.'):]}": v for k, v in list(sd.items())[-3:] if k.startswith("llm.")})
    torch.save({"model": lavis}, tmp_path / "ckpt.pth")
    summary = import_lavis(tmp_path / "ckpt.pth", tmp_path / "out")
    assert summary["arch"] == arch and summary["vision_tensors"] == 0 and summary["left_out"] > 0
    weights, _ = read_weights(tmp_path / "out")
    assert_same(weights, trained(model))
    fresh = build(7)
    report = init_from_earlier_stage_(fresh, weights)
    assert report["missing"] == [] and report["unused"] == []
    assert_same(trained(fresh), trained(model))


def test_bad_lavis_inputs(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    (tmp_path / "text.pth").write_text("not torch")
    torch.save({"model": {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(4), "mystery.w": torch.ones(1)}},
               tmp_path / "unknown.pth")
    torch.save({"model": {"ln_vision.weight": torch.ones(4), "query_tokens": torch.ones(1, 2, 4)}},
               tmp_path / "headless.pth")
    for name, fragment in (("list.pth", "not a state dict"), ("text.pth", "not a readable torch checkpoint"),
                           ("unknown.pth", "'mystery.w' has no counterpart"), ("headless.pth", "pass --arch"),
                           ("absent.pth", "no such file")):
        with pytest.raises(InteropError, match=fragment) as e:
            import_lavis(tmp_path / name, tmp_path / "out")
        assert "\n" not in str(e.value)
    with pytest.raises(InteropError, match="not a LAVIS stage1 checkpoint"):
        import_lavis(tmp_path / "headless.pth", tmp_path / "out", arch="stage1")


def test_eva_vit_weights_import_and_load(tmp_path):
    from dataclasses import replace

    from blip_train.models.eva_vit import EVAViT, load_vit_weights
    from tests.helpers.tiny import tiny_vision_config

    full = replace(tiny_vision_config(), drop_last_block=False)  # the pretrained tower: 3 blocks
    torch.manual_seed(0)
    eva = EVAViT(full)
    perturb_(eva, seed=3)
    sd = {"visual." + k: v for k, v in eva.state_dict().items()}  # EVA-CLIP style prefix, plus unused heads
    sd.update({"visual.norm.weight": torch.ones(32), "visual.head.weight": torch.zeros(10, 32)})
    torch.save(sd, tmp_path / "eva_vit_g.pth")
    summary = import_eva_vit(tmp_path / "eva_vit_g.pth", tmp_path / "vit.safetensors")
    assert summary["blocks"] == 3 and summary["dropped"] == ["norm.weight", "head.weight"]
    ours = EVAViT(tiny_vision_config())  # BLIP-2 keeps 2 of the 3 blocks
    load_vit_weights(ours, tmp_path / "vit.safetensors")
    want = {k: v for k, v in eva.state_dict().items() if not k.startswith("blocks.2.")}
    assert_same(ours.state_dict(), want)
    with pytest.raises(FileExistsError):
        import_eva_vit(tmp_path / "eva_vit_g.pth", tmp_path / "vit.safetensors")
    torch.save(dict(sd, **{"visual.blocks.0.gamma_1": torch.ones(32)}), tmp_path / "scaled.pth")
    with pytest.raises(InteropError, match="layer scale"):
        import_eva_vit(tmp_path / "scaled.pth", tmp_path / "v2.safetensors")


def test_lavis_import_exports_to_transformers_with_a_config(tmp_path):
    """LAVIS -> ours -> transformers: the import carries no config, so the export takes one (--config),
    with --set overrides on top; the transformers weights are the imported ones under HF names."""
    import yaml
    from transformers import Blip2ForImageTextRetrieval

    from blip_train.config import config_to_dict
    from blip_train.data.tokenizers import train_wordpiece_tokenizer
    from blip_train.interop.hf_export import export_hf
    from blip_train.models.hf_names import model_from_hf
    from blip_train.models.stage1 import Blip2Stage1

    torch.manual_seed(0)
    model = Blip2Stage1(tiny_model_config(), device_type="cpu")
    perturb_(model, seed=4)
    sd = model.state_dict()
    lavis = {k: v for k, v in sd.items()
             if k.startswith(("visual_encoder.", "ln_vision.", "vision_proj.", "text_proj.", "itm_head."))}
    lavis.update(lavis_qformer(sd, text_branch=True, lm_head=True), query_tokens=sd["query_tokens"],
                 temp=sd["temp"].reshape(()))
    torch.save({"model": lavis}, tmp_path / "blip2.pth")
    import_lavis(tmp_path / "blip2.pth", tmp_path / "ours")
    with pytest.raises(InteropError, match="pass --config"):
        export_hf(tmp_path / "ours", tmp_path / "hf")

    train_wordpiece_tokenizer(["a red square", "two blue circles"] * 4, vocab_size=60, out_dir=tmp_path / "tok")
    model_section = config_to_dict(tiny_model_config())
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": model_section}))
    export_hf(tmp_path / "ours", tmp_path / "hf", config=str(tmp_path / "cfg.yaml"),
              overrides=[f"model.vision.weights={tmp_path / 'ours' / 'vision.safetensors'}",
                         f"model.qformer.tokenizer={tmp_path / 'tok'}"])
    hf, info = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info
    back = model_from_hf(hf.state_dict(), "blip2_retrieval")
    want = {k: v for k, v in sd.items() if k != "temp" and not k.startswith("qformer.lm_head.")}
    assert_same(back, want)
