"""3D through the LLM stages (model.modality=3d, X-InstructBLIP's 3D branch): a frozen Point-BERT (ULIP-2's layout)
in the ViT's place, the cloud's tokens through the Q-Former, after the modality prefix ("3d: ") in the LLM's input."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from blip_train.config.schema import PointsConfig
from blip_train.data.points import PointFeatures, TooFewPointsError, farthest_point_sample, point_columns
from blip_train.models.llm_bridge import Blip2LLM, load_llm
from blip_train.models.point_encoder import (PointBertShape, PointEncoder, farthest_points, group_points,
                                             load_point_encoder, save_point_encoder)
from tests.conftest import REPO, clean_env
from tests.unit.test_llm_bridge import bridge_config, llm_dirs, make_batch  # noqa: F401 (fixture)

SHAPE = PointBertShape(trans_dim=32, depth=2, num_heads=2, group_size=8, num_group=16, encoder_dims=48,
                       in_channels=6)
NUM_POINTS = 128


def save_tiny_point_bert(folder: Path, seed: int = 0, shape: PointBertShape = SHAPE) -> Path:
    """A random tiny Point-BERT folder with BatchNorm statistics that are not the defaults (as trained ones)."""
    torch.manual_seed(seed)
    encoder = PointEncoder(shape)
    for bn in (encoder.encoder.first_conv[1], encoder.encoder.second_conv[1]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return save_point_encoder(encoder, folder)


@pytest.fixture(scope="module")
def point_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_point_bert(tmp_path_factory.mktemp("pb") / "point_bert")


def cloud(n: int = NUM_POINTS, seed: int = 0, channels: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n, 3, generator=g) * 2 - 1, torch.rand(n, channels - 3, generator=g)], dim=1)


def test_patches_are_farthest_centres_and_their_nearest_points():
    """Centres: the numpy farthest point sample the converter stores clouds in; each patch: the centre's k nearest
    points (by brute force), xyz relative to the centre, rgb as given; on a cloud stored in farthest-point order the
    centres are its first points."""
    pts = cloud()
    idx = farthest_points(pts[None, :, :3], 16)[0]
    assert idx.tolist() == farthest_point_sample(pts[:, :3].double().numpy(), 16).tolist()
    patches, centres = group_points(pts[None], 16, 8)
    assert patches.shape == (1, 16, 8, 6) and torch.equal(centres[0], pts[idx, :3])
    for g in (0, 7, 15):
        d = ((pts[:, :3] - centres[0, g]) ** 2).sum(1)
        near = d.argsort()[:8]
        assert torch.allclose(patches[0, g, :, :3], pts[near, :3] - centres[0, g])
        assert torch.equal(patches[0, g, :, 3:], pts[near, 3:])
    ordered = pts[idx]  # already farthest-point ordered: the first 16 are the centres
    assert torch.equal(farthest_points(ordered[None, :, :3], 16)[0], torch.arange(16))


def test_encoder_reads_a_set_not_a_sequence(point_bert_dir):
    """The tokens do not depend on the order of the points (after the first, where sampling starts), and the
    frozen encoder's BatchNorm uses its stored statistics."""
    enc = load_point_encoder(point_bert_dir)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    pts = cloud()
    perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(NUM_POINTS - 1) + 1])
    with torch.no_grad():
        a, b = enc(pts[None]), enc(pts[perm][None])
    assert a.shape == (1, 1 + SHAPE.num_group, SHAPE.trans_dim)
    assert torch.allclose(a, b, atol=1e-5)
    bn = enc.encoder.first_conv[1]
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    enc.train()  # a parent's .train() cannot switch a frozen tower's BatchNorm to batch statistics
    assert not bn.training
    with pytest.raises(ValueError, match=r"this encoder takes \(batch, points, 6\)"):
        enc(pts[None, :, :3])


def test_folder_load_refuses_what_is_not_its_shape(point_bert_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((point_bert_dir / name).read_bytes())
    cfg = json.loads((point_bert_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "trans_dim": 64}))
    with pytest.raises(ValueError, match=r"model.safetensors: not a Point-BERT of config.json's shape"):
        load_point_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "width": 64}))
    with pytest.raises(ValueError, match=r"config.json: unknown Point-BERT config keys \['width'\]"):
        load_point_encoder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors: missing"):
        load_point_encoder(tmp_path)


def test_ulip2_checkpoint_imports_to_the_same_encoder(point_bert_dir, tmp_path):
    """A ULIP-2 checkpoint (the whole ULIP model under 'state_dict', DDP's module. prefix, the point encoder under
    point_encoder., its projection and the other towers beside it) → a folder that loads as the same encoder; the
    dimensions come from the tensors' shapes, the head count and patch sizes from flags."""
    enc = load_point_encoder(point_bert_dir)
    state = {f"module.point_encoder.{k}": v for k, v in enc.state_dict().items()}
    state["module.pc_projection"] = torch.randn(SHAPE.trans_dim, 16)
    state["module.open_clip_model.logit_scale"] = torch.tensor(1.0)
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ulip2.pt")
    out = tmp_path / "imported"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "import_ulip2_pointbert.py"), "--checkpoint",
                        str(tmp_path / "ulip2.pt"), "--out", str(out), "--num-heads", "2", "--group-size", "8",
                        "--num-group", "16"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    imported = load_point_encoder(out)
    assert imported.shape == enc.shape
    pts = cloud()[None]
    with torch.no_grad():
        assert torch.equal(imported(pts), enc(pts))
    torch.save({"state_dict": {"module.visual.proj": torch.zeros(2)}}, tmp_path / "other.pt")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "import_ulip2_pointbert.py"), "--checkpoint",
                        str(tmp_path / "other.pt"), "--out", str(tmp_path / "x")], cwd=REPO, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no Point-BERT tensors" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def points_config(kind: str, llm_dirs, point_bert_dir, arch: str = "instruct"):  # noqa: F811
    base = bridge_config(arch, str(llm_dirs[kind]))
    return replace(base, modality="3d", modality_prefix="3d: ", attention="math",
                   points=PointsConfig(encoder=str(point_bert_dir), num_points=NUM_POINTS))


@pytest.mark.parametrize("kind,arch", [("llama", "instruct"), ("opt", "stage2")])
def test_3d_soft_prompt_is_the_point_bert_tokens_through_the_qformer(kind, arch, llm_dirs,  # noqa: F811
                                                                    point_bert_dir):
    """The queries read ln_vision(Point-BERT tokens) of the whole cloud (one piece, no position embedding); the
    loss trains the Q-Former and never the encoder; generation runs from a cloud."""
    cfg = points_config(kind, llm_dirs, point_bert_dir, arch)
    torch.manual_seed(0)
    model = Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu", prefix_ids=[7, 8])
    assert model.frame_pos is None and model.encoder is model.points_encoder
    batch = make_batch(bridge_config(arch), decoder_only=model.decoder_only, instruct=arch == "instruct")
    b = batch["llm_input_ids"].shape[0]
    batch["pixel_values"] = torch.stack([cloud(seed=i) for i in range(b)])
    qf = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
    model.eval()
    with torch.no_grad():
        soft = model.soft_prompt(batch["pixel_values"], *qf.values())
        states = model.ln_vision(load_point_encoder(point_bert_dir)(batch["pixel_values"]))
        nq = model.query_tokens.shape[1]
        q = model.qformer(query_embeds=model.query_tokens.expand(b, -1, -1), image_embeds=states,
                          input_ids=qf.get("qformer_input_ids"), attention_mask=qf.get("qformer_attention_mask"),
                          mask="bidirectional").last_hidden_state[:, :nq]
        assert torch.allclose(soft, model.llm_proj(q), atol=1e-5)
    model.train()
    model(batch)["loss"].backward()
    assert not any(p.requires_grad for p in model.points_encoder.parameters())
    assert model.query_tokens.grad.abs().sum() > 0 and model.ln_vision.weight.grad is not None
    out = model.eval().generate(batch["pixel_values"][:1], max_new_tokens=3, num_beams=1,
                                **{k: v[:1] for k, v in qf.items()})
    assert out.shape[0] == 1


def test_3d_step_matches_flop_counter(llm_dirs, point_bert_dir):  # noqa: F811
    """The frozen Point-BERT forward (its patch PointNet, embeddings and blocks), the Q-Former and the LLM over
    prefix + queries + text: torch's FlopCounterMode agrees, but for the encoder's attention products (0.1% here),
    which it does not see inside CPU SDPA."""
    from torch.utils.flop_counter import FlopCounterMode

    from blip_train.training.flops import build_flops_counter

    cfg = points_config("llama", llm_dirs, point_bert_dir)
    torch.manual_seed(0)
    model = Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu", prefix_ids=[7, 8])
    model.llm.config._attn_implementation = "eager"
    model.train()
    batch = make_batch(bridge_config("instruct"), decoder_only=True, instruct=True)
    batch["pixel_values"] = torch.stack([cloud(seed=i) for i in range(batch["llm_input_ids"].shape[0])])
    with FlopCounterMode(display=False) as counter:
        model(batch)["loss"].backward()
    _, flops = build_flops_counter(cfg, model)(batch)
    assert flops == pytest.approx(counter.get_total_flops(), rel=1e-2)


def test_reader_takes_the_first_points_and_refuses_what_does_not_fit(point_bert_dir, tmp_path):
    """The run reads a stored cloud's first model.points.num_points points (a farthest sample themselves); a
    cloud with fewer, or with other channels than the encoder's, is refused by name; config checks name keys."""
    from blip_train.config import ConfigError
    from blip_train.config.schema import ExperimentConfig
    from blip_train.config.validate import validate_config as validate
    from blip_train.data.points import model_point_features

    stored = cloud(256).numpy()
    row = {**point_columns(stored), "dataset": "solids"}
    reader = PointFeatures(NUM_POINTS, 6)
    assert torch.equal(reader(row), torch.from_numpy(stored[:NUM_POINTS].astype(np.float32)))
    with pytest.raises(TooFewPointsError, match="holds 256 points; model.points.num_points=512"):
        PointFeatures(512, 6)(row)
    with pytest.raises(ValueError, match="has 6 channels; the encoder .model.points.encoder. reads 3"):
        PointFeatures(NUM_POINTS, 3)(row)
    with pytest.raises(ValueError, match="no points column"):
        reader({"image": b"", "dataset": "coco"})
    cfg = ExperimentConfig()
    cfg.model.modality, cfg.model.points.encoder = "3d", str(point_bert_dir)
    assert model_point_features(cfg.model) == PointFeatures(8192, 6)
    with pytest.raises(ConfigError, match="model.modality: 3d feeds an LLM through the Q-Former"):
        validate(cfg)
    cfg.model.arch, cfg.model.llm.path, cfg.model.points.encoder = "instruct", str(tmp_path), ""
    with pytest.raises(ConfigError, match="model.points.encoder: required for model.modality=3d"):
        validate(cfg)


def test_the_training_loader_reads_clouds(point_bert_dir, tmp_path):
    """Synthetic solids as the loader gives them: each row's cloud (its first num_points points) as pixel_values,
    with its question."""
    from blip_train.config.schema import DataConfig, StreamConfig
    from blip_train.data.datasets import build_train_loader
    from blip_train.data.points import POINTS_COLUMNS
    from blip_train.data.schema import write_split
    from blip_train.data.synthetic_points import make_rows

    rows = [r for i in range(4) for r in make_rows(i, seed=0, num_points=256)]
    assert {r["question"] for r in rows[:3]} == {"what shape is this?", "what color is it?", "is it tall or wide?"}
    write_split(tmp_path / "solids", rows, extra_columns=POINTS_COLUMNS)
    cfg = DataConfig(train=[StreamConfig(local=str(tmp_path / "solids"))], num_workers=0)
    loader = build_train_loader(cfg, 4, reader=PointFeatures(NUM_POINTS, 6), kind="vqa")
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, NUM_POINTS, 6)
    xyz = batch["pixel_values"][..., :3]
    assert xyz.norm(dim=-1).max() <= 1.0 + 1e-5 and xyz.norm(dim=-1).max() > 0.9  # normalised into the unit sphere


def test_a_3d_model_starts_from_an_image_qformer_but_its_encoder_side(llm_dirs, tmp_path):  # noqa: F811
    """X-InstructBLIP starts each modality's Q-Former from BLIP-2's image one, except what reads the encoder:
    model.init_from with an image checkpoint loads the queries, self-attention and FFNs, and leaves ln_vision and the
    cross-attention (another width) new; a checkpoint of the same encoder width loads them too."""
    from blip_train.models.llm_bridge import init_from_earlier_stage_

    image_cfg = bridge_config("stage2", str(llm_dirs["opt"]))
    torch.manual_seed(1)
    image = Blip2LLM(image_cfg, load_llm(image_cfg.llm, "cpu"), device_type="cpu")
    state = {k: v for k, v in image.state_dict().items() if not k.startswith(("llm.", "visual_encoder."))}
    wider = save_tiny_point_bert(tmp_path / "pb48", shape=replace(SHAPE, trans_dim=48))
    cfg = points_config("opt", llm_dirs, wider, arch="stage2")
    torch.manual_seed(0)
    model = Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert image.ln_vision.weight.shape != model.ln_vision.weight.shape
    report = init_from_earlier_stage_(model, state)
    assert "query_tokens" in report["loaded"] and "qformer.layers.0.self_attn.query.weight" in report["loaded"]
    assert "ln_vision.weight" in report["missing"] and "qformer.layers.0.cross_attn.key.weight" in report["missing"]
    assert not any("cross_attn" in k for k in report["loaded"])
    assert torch.equal(model.query_tokens, image.query_tokens)
    assert torch.equal(model.state_dict()["qformer.layers.0.cross_attn.query.weight"],
                       before["qformer.layers.0.cross_attn.query.weight"])
    same = {k: v for k, v in model.state_dict().items() if not k.startswith(("llm.", "points_encoder."))}
    report = init_from_earlier_stage_(model, same)  # a 3D checkpoint: everything, the encoder side included
    assert "ln_vision.weight" in report["loaded"] and "qformer.layers.0.cross_attn.key.weight" in report["loaded"]
