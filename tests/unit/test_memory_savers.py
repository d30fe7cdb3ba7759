"""Memory savers, each a config switch: activation checkpointing (ViT, Q-Former), ZeRO-3 offload of
frozen weights, frozen towers in 16-bit and run under no_grad, fused AdamW (CUDA only).

Checkpointing must change memory, not math: same loss and same gradients as without it, on a plain
module and under a 1-rank in-process ZeRO-3 engine where every parameter (frozen ones included) is
partitioned and must be gathered again for the recomputation.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from blip_train.config import ConfigError, load_config
from blip_train.data.device import finish_batch
from blip_train.models.stage1 import Blip2Stage1, frozen_vision_dtype
from blip_train.models.world import WorldInfo
from blip_train.training.engine import build_engine, build_optimizer
from blip_train.training.stages import build_stage
from tests.helpers.tiny import tiny_model_config
from tests.helpers.tiny_run import write_tiny_config

B = 3


def _batch(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t, v = cfg.max_txt_len, cfg.qformer.vocab_size
    ids = torch.randint(5, v - 1, (B, t), generator=g)
    mask = torch.ones(B, t, dtype=torch.long)
    mask[1, t // 2:] = 0
    itg = ids.clone()
    itg[:, 0] = v - 1
    size = cfg.vision.image_size
    return {"pixel_values": torch.randn(B, 3, size, size, generator=g), "text_ids": ids, "text_mask": mask,
            "itg_input_ids": itg, "itg_labels": itg.masked_fill(mask == 0, -100), "image_ids": torch.arange(B)}


def _loss_and_grads(cfg, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the number of Q-Former layer-0 forward calls (recomputation shows as extra)."""
    torch.manual_seed(0)
    model = Blip2Stage1(cfg, device_type="cpu").train()
    calls = []
    # a pre-hook: the recomputation stops early, once it has what backward needs
    model.qformer.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)  # the ITM negatives
    loss = model(batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("vision_frozen", [True, False])
def test_activation_checkpointing_same_loss_and_gradients(vision_frozen):
    base = tiny_model_config()  # fp32 towers, dropout 0
    base = replace(base, vision=replace(base.vision, frozen=vision_frozen))
    saver = replace(base, vision=replace(base.vision, grad_checkpointing=True),
                    qformer=replace(base.qformer, grad_checkpointing=True))
    batch = _batch(base)
    loss_a, grads_a, calls_a = _loss_and_grads(base, batch)
    loss_b, grads_b, calls_b = _loss_and_grads(saver, batch)
    assert calls_b > calls_a  # the layers really ran again in backward
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    assert any(k.startswith("visual_encoder.") for k in grads_a) != vision_frozen
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------ under a 1-rank ZeRO-3 engine

def _zero3_fp32_template(tmp_path) -> str:
    """ZeRO-3 without mixed precision (the shipped templates enable bf16): exact comparisons."""
    path = tmp_path / "zero3_fp32.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return str(path)


def _engine(tiny_assets, tmp_path, name: str, sets: tuple[str, ...] = (), **sections):
    """In-process 1-rank engine for the tiny stage-1 experiment; `sets` are --set overrides."""
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(str(write_tiny_config(tiny_assets, tmp_path / name, **sections)), list(sets))
    stage = build_stage(cfg, WorldInfo(), on_cuda=False)
    engine, ds_config = build_engine(stage.model, cfg, 1, on_cuda=False)
    return engine, stage, ds_config


def _zero3_grads(engine, batch) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, full (gathered) gradients, and Q-Former layer-0 calls of one forward + backward."""
    from deepspeed.utils import safe_get_full_grad

    calls = []
    hook = engine.module.qformer.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    loss = engine(batch)["loss"]
    engine.backward(loss)
    hook.remove()
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, len(calls)


@pytest.mark.parametrize("vision_frozen", [True, False])
def test_activation_checkpointing_under_zero3(tiny_assets, tmp_path, vision_frozen):
    common = dict(deepspeed={"config": _zero3_fp32_template(tmp_path), "precision": "fp32",
                             "param_persistence_threshold": 0},
                  optim={"warmup_steps": 0})
    sets = (f"model.vision.frozen={str(vision_frozen).lower()}", "model.vision.precision=fp32",
            "model.qformer.dropout=0.0")
    ckpt = ("model.vision.grad_checkpointing=true", "model.qformer.grad_checkpointing=true")
    plain, stage, _ = _engine(tiny_assets, tmp_path, "plain", sets, **common)
    batch = finish_batch(next(iter(stage.build_train_loader())))
    saver, _, _ = _engine(tiny_assets, tmp_path, "ckpt", sets + ckpt, **common)
    assert saver.module.qformer.grad_checkpointing and saver.module.visual_encoder.grad_checkpointing
    frozen = [p for p in saver.module.parameters() if not p.requires_grad]
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in saver.module.parameters())  # all partitioned
    assert bool(frozen) == vision_frozen
    loss_a, grads_a, calls_a = _zero3_grads(plain, batch)
    loss_b, grads_b, calls_b = _zero3_grads(saver, batch)
    assert calls_b > calls_a  # recomputed in backward, with the partitioned weights gathered again
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    saver.step()  # the optimizer step after a checkpointed backward works too


# ------------------------------------------------------------------ offload, 16-bit frozen, fused

def test_offload_frozen_sets_offload_param_and_trains(tiny_assets, tmp_path):
    from blip_train.distributed.zero import gathered

    engine, stage, ds = _engine(tiny_assets, tmp_path, "offload", deepspeed={"offload_frozen": True},
                                optim={"warmup_steps": 0})
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert ds["zero_force_ds_cpu_optimizer"] is False
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    with gathered(trainable):
        before = [p.detach().clone() for p in trainable]
    loss = engine(finish_batch(next(iter(stage.build_train_loader()))))["loss"]
    engine.backward(loss)
    engine.step()
    with gathered(trainable):
        after = [p.detach().clone() for p in trainable]
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def _async_io() -> bool:
    from blip_train.training.engine import async_io_available
    return async_io_available()


WIDE_VISION = {"width": 512, "mlp_dim": 2048, "heads": 4, "layers": 2, "weights": ""}
"""A frozen ViT whose big tensors (1.5-2 MiB in bf16) pass DeepSpeed's 1 MiB minimum for NVMe swapping."""


def test_nvme_offload_trains_like_no_offload(tiny_assets, tmp_path):
    """Where DeepSpeed's async-I/O op builds (libaio present), 1-rank runs with the frozen ViT offloaded to
    NVMe (here: files under tmp) give the losses of a run without offload, step for step, and DeepSpeed's
    swap files are there. The first use compiles the op (minutes)."""
    from tests.helpers.tiny_run import VISION, read_losses, run_train

    if not _async_io():
        pytest.skip("DeepSpeed's async-I/O op cannot be built here (no libaio); the refusal is tested instead")
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    losses = {}
    for name, ds in (("plain", {}), ("nvme", {"offload_frozen": True, "offload_device": "nvme",
                                              "nvme_path": str(nvme)})):
        run = tmp_path / name
        run_train(write_tiny_config(tiny_assets, run, model={"vision": dict(VISION, **WIDE_VISION)}, deepspeed=ds,
                                    train={"max_steps": 3, "save_interval": 3}), nproc=1, timeout=900)
        losses[name] = read_losses(run)
    assert sorted(losses["nvme"]) == [1, 2, 3] and losses["nvme"] == losses["plain"]
    swapped = list(nvme.rglob("*.swp"))
    assert len(swapped) >= 3 and all(f.stat().st_size >= 2**20 for f in swapped)


def _wide_t5(folder):
    """A T5 whose embedding and LM head (2048 x 512, 2 MiB in bf16) pass the NVMe swapping minimum."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    from blip_train.data.tokenizers import train_bpe_tokenizer
    from tests.parity.test_export_hf_models import TEXTS

    tok = train_bpe_tokenizer(TEXTS, vocab_size=90, out_dir=folder, style="t5")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=2048, d_model=512, d_kv=64, d_ff=1024, num_layers=1, num_decoder_layers=1, num_heads=8,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    AutoModelForSeq2SeqLM.from_config(cfg).save_pretrained(str(folder))
    return folder


def test_nvme_offload_of_a_frozen_llm_and_vit_trains_like_no_offload(tiny_assets, tmp_path):
    """Stage 2 with both frozen towers on NVMe (the LLM loaded by transformers under zero.Init, then the ViT
    under ours): the losses of a run without offload, and both towers' swap files are there. Failed before:
    the ViT's zero.Init started a second swapper, which emptied the swap folder (the LLM's files gone: the
    first forward's async_pread assertion), and DeepSpeed's NVMe prefetch asserted on FlanT5's embedding,
    which a forward reads twice ("already assigned swap buffer id")."""
    from tests.helpers.tiny_run import VISION, read_losses, run_train

    if not _async_io():
        pytest.skip("DeepSpeed's async-I/O op cannot be built here (no libaio); the refusal is tested instead")
    t5, nvme = _wide_t5(tmp_path / "t5"), tmp_path / "nvme"
    nvme.mkdir()
    model = {"arch": "stage2", "vision": dict(VISION, **WIDE_VISION),
             "llm": {"path": str(t5), "dtype": "bf16", "max_txt_len": 12, "max_prompt_len": 16}}
    losses = {}
    for name, ds in (("plain", {}), ("nvme", {"offload_frozen": True, "offload_device": "nvme",
                                              "nvme_path": str(nvme)})):
        run = tmp_path / name
        run_train(write_tiny_config(tiny_assets, run, model=model, deepspeed=ds,
                                    train={"max_steps": 2, "save_interval": 2}), nproc=1, timeout=900)
        losses[name] = read_losses(run)
    assert sorted(losses["nvme"]) == [1, 2] and losses["nvme"] == losses["plain"]
    sizes = sorted(f.stat().st_size for f in nvme.rglob("*.swp"))
    assert len(sizes) >= 4 and sizes[-1] >= 2 * 2**20  # the ViT's big tensors and the T5's 2 MiB ones


def test_nvme_offload_refused_in_one_line_before_any_work(tiny_assets, tmp_path):
    """Where the async-I/O op cannot be built (no libaio), `python -m blip_train.train` refuses NVMe offload
    with one line naming the key, before creating anything."""
    import subprocess
    import sys

    from tests.conftest import REPO, clean_env

    if _async_io():
        pytest.skip("DeepSpeed's async-I/O op builds here: NVMe offload is trained for real instead")
    run = tmp_path / "run"
    config = write_tiny_config(tiny_assets, run, deepspeed={"offload_frozen": True, "offload_device": "nvme",
                                                            "nvme_path": str(tmp_path)})
    r = subprocess.run([sys.executable, "-m", "blip_train.train", "--config", str(config)], capture_output=True,
                       text=True, env=clean_env(), cwd=REPO, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.startswith("config error")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("config error: deepspeed.offload_device: nvme needs DeepSpeed's async-I/O op")
    assert not run.exists()


def test_offload_is_a_zero3_setting():
    with pytest.raises(ConfigError, match="deepspeed.offload_frozen: needs deepspeed.zero_stage=3"):
        load_config(None, ["deepspeed.offload_frozen=true", "deepspeed.config=zero2", "deepspeed.zero_stage=2"])


def test_frozen_vit_is_16_bit_and_runs_without_autograd(tiny_assets, tmp_path):
    # fp32 trainable part: DeepSpeed casts nothing, so the tower's dtype is the one the builder chose
    engine, stage, _ = _engine(tiny_assets, tmp_path, "frozen16",
                               deepspeed={"config": _zero3_fp32_template(tmp_path), "precision": "fp32"})
    vit = engine.module.visual_encoder
    assert all(p.dtype in (torch.bfloat16, torch.float16) and not p.requires_grad for p in vit.parameters())
    assert all(p.dtype == torch.float32 for p in engine.module.qformer.parameters())
    grad_mode = []
    vit.register_forward_hook(lambda *_: grad_mode.append(torch.is_grad_enabled()))
    engine.backward(engine(finish_batch(next(iter(stage.build_train_loader()))))["loss"])
    assert grad_mode == [False]  # no activations are kept for the frozen tower
    assert all(p.grad is None for p in vit.parameters())
    assert not vit.training  # a frozen tower stays in eval mode under engine.train()


def test_frozen_vision_dtype_choice():
    assert frozen_vision_dtype("fp16", "cuda") == torch.float16
    assert frozen_vision_dtype("fp16", "cpu") == torch.bfloat16  # CPU fp16 kernels are incomplete
    assert frozen_vision_dtype("bf16", "cuda") == torch.bfloat16
    assert frozen_vision_dtype("fp32", "cuda") == torch.float32


def test_fused_adamw_on_cpu_only_when_asked():
    """auto keeps the CPU's foreach AdamW (the numerics CPU runs were recorded with); `on` takes torch's fused
    kernel on a CPU too (bench/scale.py: the step's memory as on a GPU)."""
    model = Blip2Stage1(tiny_model_config(), device_type="cpu")
    assert build_optimizer(model, load_config(None, ["optim.fused='on'"]), on_cuda=False).defaults["fused"]
    auto = build_optimizer(model, load_config(None, ["optim.fused=auto"]), on_cuda=False)
    assert not auto.defaults["fused"]  # auto: fused only on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda():
    model = Blip2Stage1(tiny_model_config(), device_type="cuda").cuda()
    opt = build_optimizer(model, load_config(None, ["optim.fused=auto"]), on_cuda=True)
    assert opt.defaults["fused"] is True


def test_a_config_error_after_a_checkpoint_keeps_the_run(tmp_path, monkeypatch):
    """Only a run refused before it saved anything is removed: a ConfigError late in a fresh run (an answer list
    deleted under a running evaluation) must not take its checkpoints with it."""
    import blip_train.training.loop as loop
    from blip_train.config import ConfigError
    from blip_train.train import main

    run = tmp_path / "run"

    def train_then_refuse(cfg, allow_config_change=False):
        (run / "checkpoints" / "step_0000100").mkdir(parents=True)
        raise ConfigError("eval.answer_list: gone")

    monkeypatch.setattr(loop, "train", train_then_refuse)
    (tmp_path / "c.yaml").write_text(f"run: {{output_dir: {run}}}\n")
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert (run / "checkpoints" / "step_0000100").is_dir()
