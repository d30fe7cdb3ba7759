"""The authors' BLIP pretraining checkpoint (model_base.pth layout: timm ViT, BertModel text encoder, BertLMHeadModel
decoder tied to it except the self-attention, heads, temp, momentum copies, feature queues) through
tools/import_lavis.py, then model.init_from through build_blip_model: the online weights, the momentum copies and
the queue are the checkpoint's (not copies of the online weights).

The checkpoint is written from a BlipPretrain with every tensor made distinct, renamed by a table written here
independently of hf_names."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from blip_train.config import load_config
from blip_train.interop.lavis import import_lavis
from blip_train.interop.weights_io import InteropError, read_weights
from blip_train.training.stages import build_blip_model
from tests.helpers.tiny_run import write_tiny_blip_config

BERT_NAMES = [  # (ours, BERT's) inside one MED, `L` = encoder.layer.{i}.
    (r"embeddings\.norm\.", "embeddings.LayerNorm."),
    (r"layers\.(\d+)\.(self_attn|self_attn_dec)\.(query|key|value)\.", r"encoder.layer.\1.attention.self.\3."),
    (r"layers\.(\d+)\.(self_attn|self_attn_dec)\.out\.", r"encoder.layer.\1.attention.output.dense."),
    (r"layers\.(\d+)\.(self_attn|self_attn_dec)\.norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"layers\.(\d+)\.cross_attn\.(query|key|value)\.", r"encoder.layer.\1.crossattention.self.\2."),
    (r"layers\.(\d+)\.cross_attn\.out\.", r"encoder.layer.\1.crossattention.output.dense."),
    (r"layers\.(\d+)\.cross_attn\.norm\.", r"encoder.layer.\1.crossattention.output.LayerNorm."),
    (r"layers\.(\d+)\.ffn\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"layers\.(\d+)\.ffn\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"layers\.(\d+)\.ffn\.norm\.", r"encoder.layer.\1.output.LayerNorm."),
    (r"lm_head\.dense\.", "cls.predictions.transform.dense."),
    (r"lm_head\.norm\.", "cls.predictions.transform.LayerNorm."),
    (r"lm_head\.decoder\.weight", "cls.predictions.decoder.weight"),
    (r"lm_head\.decoder\.bias", "cls.predictions.bias"),
]


def bert_name(key: str) -> str:
    for ours, theirs in BERT_NAMES:
        if re.match(ours, key):
            return re.sub(ours, theirs, key, count=1)
    return key  # embeddings.word_embeddings / position_embeddings keep their names


def med_part(sd: dict, root: str, part: str, decoder: bool) -> dict:
    """`root`.* MED tensors as the authors' `part`.* (decoder: BertLMHeadModel under bert. / cls.)."""
    skip = (".self_attn.",) if decoder else (".self_attn_dec.", ".lm_head.")  # what the other view holds
    out = {}
    for k, v in sd.items():
        if not k.startswith(root) or any(s in "." + k[len(root):] for s in skip):
            continue
        name = bert_name(k[len(root):])
        out[f"{part}.{'bert.' + name if decoder and not name.startswith('cls.') else name}"] = v
    out[f"{part}.{'bert.' if decoder else ''}embeddings.position_ids"] = torch.arange(64)[None]
    if decoder:
        out[f"{part}.cls.predictions.decoder.bias"] = out[f"{part}.cls.predictions.bias"]
    return out


def timm_vit(sd: dict, root: str, g: torch.Generator) -> dict:
    """EVAViT tensors as timm names them: a full qkv bias (with a k part, which the import drops)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(root) or k.endswith("v_bias"):
            continue
        if k.endswith("q_bias"):
            v_bias = sd[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.randn(v.shape, generator=g), v_bias])
        else:
            out[k] = v
    return out


def authors_checkpoint(model) -> dict:
    g = torch.Generator().manual_seed(1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = {**timm_vit(sd, "visual_encoder.", g), **timm_vit(sd, "visual_encoder_m.", g)}
    ckpt.update(med_part(sd, "text.", "text_encoder", decoder=False))
    ckpt.update(med_part(sd, "text.", "text_decoder", decoder=True))
    momentum_text = med_part(sd, "text_m.", "text_encoder_m", decoder=False)
    for i in range(2):  # the authors' momentum encoder has cross-attention, which ours (unimodal) drops
        momentum_text[f"text_encoder_m.encoder.layer.{i}.crossattention.self.query.weight"] = torch.randn(32, 32)
    ckpt.update(momentum_text)
    for k in ("vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m"):
        ckpt.update({n: v for n, v in sd.items() if n.startswith(k + ".")})
    ckpt["temp"] = sd["temp"].reshape(())
    ckpt.update(image_queue=sd["queue.image_queue"], text_queue=sd["queue.text_queue"], queue_ptr=sd["queue.ptr"])
    return ckpt


@pytest.fixture
def cfg(tiny_assets, tmp_path):
    return load_config(str(write_tiny_blip_config(tiny_assets, tmp_path / "run")))


def distinct_model(cfg):
    model, _ = build_blip_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():  # online and momentum tensors all differ
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        model.queue.image_queue.normal_(generator=g)
        model.queue.ptr.fill_(8)
        # The authors keep no momentum LM head (BLIP's momentum model never runs it): ours starts as the online one.
        online = dict(model.text.lm_head.named_parameters())
        for name, p in model.text_m.lm_head.named_parameters():
            if name != "decoder.weight":  # the momentum word embeddings (tied), which the authors do keep
                p.copy_(online[name])
    return model


def test_authors_checkpoint_imports_with_momentum_and_queue(cfg, tmp_path):
    model = distinct_model(cfg)
    torch.save({"model": authors_checkpoint(model)}, tmp_path / "model_base.pth")
    summary = import_lavis(tmp_path / "model_base.pth", tmp_path / "ours")
    assert summary["arch"] == "blip" and summary["notes"] == [] and summary["queue_tensors"] == 3
    weights, meta = read_weights(tmp_path / "ours")
    assert meta["arch"] == "blip" and meta["contents"] == "trainable+momentum"

    report: dict = {}
    built, _ = build_blip_model(replace(cfg, model=replace(cfg.model, init_from=str(tmp_path / "ours"))), report=report)
    assert report == {"kept": [], "decoder_from_encoder": [], "answer_decoder": [], "momentum": "loaded",
                      "queue": "loaded"}
    want, got = model.state_dict(), built.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not all(torch.equal(p, m) for p, m in built.momentum_pairs())  # the copies are the checkpoint's own


def test_init_from_refuses_a_model_of_another_size(cfg, tmp_path):
    model = distinct_model(cfg)
    torch.save(authors_checkpoint(model), tmp_path / "model_base.pth")
    import_lavis(tmp_path / "model_base.pth", tmp_path / "ours", arch="blip")
    bigger = replace(cfg.model, init_from=str(tmp_path / "ours"), embed_dim=24)
    with pytest.raises(ValueError, match=r"_proj\.(weight|bias) has shape"):
        build_blip_model(replace(cfg, model=bigger))
    with pytest.raises(InteropError, match="no counterpart"):
        torch.save({**authors_checkpoint(model), "bogus.weight": torch.zeros(1)}, tmp_path / "bad.pth")
        import_lavis(tmp_path / "bad.pth", tmp_path / "bad")


def test_a_run_starts_from_the_import(cfg, tmp_path, capsys):
    """The trainer's builder (model.arch=blip) accepts model.init_from and says what it loaded."""
    from blip_train.models.world import WorldInfo
    from blip_train.training.stages import build_stage

    model = distinct_model(cfg)
    torch.save({"model": authors_checkpoint(model)}, tmp_path / "model_base.pth")
    import_lavis(tmp_path / "model_base.pth", tmp_path / "ours")
    stage = build_stage(replace(cfg, model=replace(cfg.model, init_from=str(tmp_path / "ours"))), WorldInfo(),
                        on_cuda=False)
    out = capsys.readouterr().out
    assert "kept initial values for none" in out and "momentum copies loaded; queue loaded" in out
    assert torch.equal(stage.model.visual_encoder_m.pos_embed, model.visual_encoder_m.pos_embed)


def test_albef_init_from_our_weights_copies_the_momentum_encoders(tiny_assets, tmp_path):
    """ALBEF (no transformers class) starts from a weights folder of ours (what zero_to_safetensors writes): the
    trainable weights load strictly and the momentum copies become them."""
    from blip_train.interop.weights_io import write_weights

    cfg = load_config(str(write_tiny_blip_config(tiny_assets, tmp_path / "run", arch="albef")))
    model = distinct_model(cfg)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    write_weights(trained, tmp_path / "w", {"arch": "albef", "contents": "trainable"})
    report: dict = {}
    built, _ = build_blip_model(replace(cfg, model=replace(cfg.model, init_from=str(tmp_path / "w"))), report=report)
    assert report == {"kept": [], "decoder_from_encoder": [], "answer_decoder": [], "momentum": "copied",
                      "queue": "initial"}
    state = dict(built.named_parameters())
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert all(torch.equal(p, m) for p, m in built.momentum_pairs())
    del trained["itm_head.weight"]
    write_weights(trained, tmp_path / "w2", {"arch": "albef", "contents": "trainable"})
    with pytest.raises(KeyError, match="itm_head.weight"):
        build_blip_model(replace(cfg, model=replace(cfg.model, init_from=str(tmp_path / "w2"))))


def test_authors_vqa_checkpoint_imports_as_a_vqa_model(tiny_assets, tmp_path):
    """model_base_vqa_capfilt_large.pth's layout: timm ViT, text_encoder and an untied text_decoder, no heads. It
    becomes a model.objective=vqa model's question encoder and answer decoder, tensor for tensor."""
    cfg = load_config(str(write_tiny_blip_config(tiny_assets, tmp_path / "run", model={"objective": "vqa"})))
    model, _ = build_blip_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = {**timm_vit(sd, "visual_encoder.", g), **med_part(sd, "text.", "text_encoder", decoder=False),
            **med_part(sd, "text_decoder.", "text_decoder", decoder=True)}
    torch.save({"model": ckpt}, tmp_path / "model_vqa.pth")
    summary = import_lavis(tmp_path / "model_vqa.pth", tmp_path / "ours")
    assert summary["objective"] == "vqa"
    report: dict = {}
    built, _ = build_blip_model(replace(cfg, model=replace(cfg.model, init_from=str(tmp_path / "ours"))), report=report)
    assert report["answer_decoder"] == [] and report["momentum"] == "none"
    got = dict(built.named_parameters())
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(got[k], p), k


def test_authors_albef_checkpoint_imports_with_momentum_and_queue(tiny_assets, tmp_path):
    """ALBEF_4M.pth's layout: timm ViT, text_encoder as a BertForMaskedLM (bert.* + cls.*, cross-attention from the
    fusion layer on) with token-type embeddings, heads, momentum copies and queues. The token-type row folds into
    the position embeddings, so the text encoder's embedding sums are the checkpoint's."""
    cfg = load_config(str(write_tiny_blip_config(tiny_assets, tmp_path / "run", arch="albef")))
    model = distinct_model(cfg)
    g = torch.Generator().manual_seed(2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}

    def masked_lm(root: str, part: str) -> dict:
        out = {}
        for k, v in sd.items():
            if k.startswith(root):
                name = bert_name(k[len(root):])
                out[f"{part}.{name if name.startswith('cls.') else 'bert.' + name}"] = v
        token_type = torch.randn(2, out[f"{part}.bert.embeddings.position_embeddings.weight"].shape[1], generator=g)
        out[f"{part}.bert.embeddings.token_type_embeddings.weight"] = token_type
        out[f"{part}.bert.embeddings.position_embeddings.weight"] = \
            out[f"{part}.bert.embeddings.position_embeddings.weight"] - token_type[0]
        out[f"{part}.cls.predictions.decoder.bias"] = out[f"{part}.cls.predictions.bias"]
        return out

    ckpt = {**timm_vit(sd, "visual_encoder.", g), **timm_vit(sd, "visual_encoder_m.", g),
            **masked_lm("text.", "text_encoder"), **masked_lm("text_m.", "text_encoder_m")}
    for k in ("vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m"):
        ckpt.update({n: v for n, v in sd.items() if n.startswith(k + ".")})
    ckpt["temp"] = sd["temp"].reshape(())
    ckpt.update(image_queue=sd["queue.image_queue"], text_queue=sd["queue.text_queue"], queue_ptr=sd["queue.ptr"])
    assert any(".crossattention." in k for k in ckpt) and not any(".self_attn_dec." in k for k in ckpt)
    torch.save({"model": ckpt}, tmp_path / "ALBEF_4M.pth")
    summary = import_lavis(tmp_path / "ALBEF_4M.pth", tmp_path / "ours")
    assert summary["arch"] == "albef" and summary["queue_tensors"] == 3
    report: dict = {}
    built, _ = build_blip_model(replace(cfg, model=replace(cfg.model, init_from=str(tmp_path / "ours"))),
                                report=report)
    assert report["kept"] == [] and report["momentum"] == "loaded" and report["queue"] == "loaded"
    want, got = model.state_dict(), built.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        if k.endswith("embeddings.position_embeddings.weight"):  # (P - t) + t: equal to rounding
            assert torch.allclose(got[k], want[k], atol=1e-6), k
        else:
            assert torch.equal(got[k], want[k]), k
