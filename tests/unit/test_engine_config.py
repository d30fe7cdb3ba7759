"""DeepSpeed JSON injection, schedule and parameter groups (no engine needed)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blip_train.config import ConfigError, load_config
from blip_train.training.engine import apply_lr_, build_ds_config, build_param_groups, lr_at


def _cfg(*sets):
    return load_config(None, list(sets))


def test_batch_sizes_precision_and_stage_injected():
    cfg = _cfg("train.micro_batch_size=4", "train.grad_accum_steps=3", "optim.grad_clip=1.0",
               "deepspeed.param_persistence_threshold=0")
    ds = build_ds_config(cfg, world_size=2, on_cuda=False)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_gathered_parameter_bounds_override_the_template():
    zero = build_ds_config(_cfg(), world_size=2, on_cuda=False)["zero_optimization"]
    template = {k: zero[k] for k in ("stage3_max_live_parameters", "stage3_max_reuse_distance",
                                     "stage3_prefetch_bucket_size")}
    cfg = _cfg("deepspeed.max_live_parameters=200000000", "deepspeed.max_reuse_distance=0",
               "deepspeed.prefetch_bucket_size=1000")
    zero = build_ds_config(cfg, world_size=2, on_cuda=False)["zero_optimization"]
    assert (zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"],
            zero["stage3_prefetch_bucket_size"]) == (200000000, 0, 1000)
    assert template != {k: zero[k] for k in template}  # -1 (the default) kept the template's values


def test_global_batch_mismatch_refused():
    cfg = _cfg("train.micro_batch_size=4", "train.global_batch_size=10")
    with pytest.raises(ConfigError, match="train.global_batch_size: 10 != micro_batch_size 4"):
        build_ds_config(cfg, world_size=2, on_cuda=False)


def test_template_contradicting_precision_refused():
    cfg = _cfg("deepspeed.config=zero3_fp16")  # precision stays bf16
    with pytest.raises(ConfigError, match="contradicts the template 'zero3_fp16'"):
        build_ds_config(cfg, world_size=1, on_cuda=False)


def test_hf_trainer_auto_values_are_decided_by_the_experiment(tmp_path):
    """A DeepSpeed JSON written for the HF Trainer: "auto" where the experiment decides (batch, accumulation,
    clipping, precision, stage; an all-"auto" AdamW), a number everywhere else."""
    import json

    hf = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}},
          "zero_optimization": {"stage": "auto", "overlap_comm": True, "stage3_max_live_parameters": 1e8}}
    path = tmp_path / "hf_zero3.json"
    path.write_text(json.dumps(hf))
    cfg = _cfg(f"deepspeed.config={path}", "train.micro_batch_size=4", "train.grad_accum_steps=2", "optim.grad_clip=1.0")
    ds = build_ds_config(cfg, world_size=2, on_cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["gradient_clipping"]) == (16, 4, 2, 1.0)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False and "optimizer" not in ds
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_max_live_parameters"] == 1e8
    for bad, message in (
            ({"zero_optimization": {"reduce_bucket_size": "auto"}}, "sets zero_optimization.reduce_bucket_size to "
                                                                    "\"auto\", which only the HF Trainer fills in"),
            ({"optimizer": {"type": "AdamW", "params": {"lr": 3e-5}}}, "the template sets 'optimizer'"),
            ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}, "the template sets 'scheduler'"),
            ({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}, "the template sets 'optimizer'")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            build_ds_config(_cfg(f"deepspeed.config={path}"), world_size=1, on_cuda=False)


def test_template_contradicting_zero_stage_refused():
    for sets, fragment in ((["deepspeed.config=zero2"], "deepspeed.zero_stage: 3 contradicts the template 'zero2'"),
                           (["deepspeed.config=zero3_offload", "deepspeed.zero_stage=2"],
                            "deepspeed.zero_stage: 2 contradicts the template 'zero3_offload'")):
        with pytest.raises(ConfigError, match=fragment):
            build_ds_config(_cfg(*sets), world_size=1, on_cuda=False)


def test_offload_template_and_stage2_cleanup():
    ds = build_ds_config(_cfg("deepspeed.config=zero3_offload"), world_size=1, on_cuda=False)
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert ds["zero_force_ds_cpu_optimizer"] is False
    ds2 = build_ds_config(_cfg("deepspeed.config=zero2", "deepspeed.zero_stage=2"), world_size=1, on_cuda=False)
    assert not any(k.startswith("stage3_") for k in ds2["zero_optimization"])


def test_unknown_template_refused():
    with pytest.raises(ConfigError, match="deepspeed.config: 'zero9'"):
        build_ds_config(_cfg("deepspeed.config=zero9"), world_size=1, on_cuda=False)


def test_warmup_then_step_decay_per_epoch():
    """BLIP pretraining: warm up, then x0.85 every epoch (decay_steps), never below min_lr."""
    cfg = _cfg("optim.lr=3e-4", "optim.min_lr=1e-4", "optim.warmup_steps=10", "optim.schedule=step",
               "optim.decay_rate=0.85", "optim.decay_steps=100", "train.max_steps=2000")
    assert lr_at(5, cfg) == pytest.approx(1.5e-4)
    assert lr_at(10, cfg) == lr_at(109, cfg) == pytest.approx(3e-4)
    assert lr_at(110, cfg) == pytest.approx(3e-4 * 0.85)
    assert lr_at(310, cfg) == pytest.approx(3e-4 * 0.85 ** 3)
    assert lr_at(1500, cfg) == pytest.approx(1e-4)  # 3e-4 x 0.85^14 would be 3.1e-5


def test_warmup_then_cosine_to_min_lr():
    cfg = _cfg("optim.lr=1e-4", "optim.min_lr=1e-5", "optim.warmup_steps=10", "train.max_steps=110")
    assert lr_at(0, cfg) == 0.0
    assert lr_at(5, cfg) == pytest.approx(5e-5)
    assert lr_at(10, cfg) == pytest.approx(1e-4)
    assert lr_at(60, cfg) == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(1e-5)
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(2))]},
                             {"params": [nn.Parameter(torch.zeros(2))], "lr_scale": 0.5}], lr=1e-4)
    assert apply_lr_(opt, 5, cfg) == pytest.approx(5e-5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 2.5e-5])


def test_no_weight_decay_on_biases_norms_queries_temp_and_frozen_excluded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.query_tokens = nn.Parameter(torch.zeros(1, 2, 4))
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
    m = M()
    decay, no_decay = build_param_groups(m, 0.05)
    assert [id(p) for p in decay["params"]] == [id(m.lin.weight)]
    assert {id(p) for p in no_decay["params"]} == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias),
                                                   id(m.query_tokens), id(m.temp)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


@pytest.fixture
def async_io(monkeypatch):
    """Pretend DeepSpeed's async-I/O op can be built (this machine may lack libaio); yields a setter."""
    import blip_train.training.engine as engine

    state = {"available": True}
    monkeypatch.setattr(engine, "async_io_available", lambda: state["available"])
    return state


def test_nvme_offload_json(async_io, tmp_path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    nvme = [f"deepspeed.nvme_path={tmp_path}", "deepspeed.offload_device=nvme"]
    ds = build_ds_config(_cfg("deepspeed.offload_frozen=true", *nvme), world_size=1, on_cuda=False)
    # Both frozen towers share one pool of swap buffers: at least 16; no NVMe prefetch (see engine.py).
    assert ds["zero_optimization"]["offload_param"] == {"device": "nvme", "pin_memory": False,
                                                        "nvme_path": str(tmp_path), "buffer_count": 16}
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
    assert ds["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match="deepspeed.prefetch_bucket_size: 1000 with NVMe offload"):
        build_ds_config(_cfg("deepspeed.offload_frozen=true", "deepspeed.prefetch_bucket_size=1000", *nvme),
                        world_size=1, on_cuda=False)
    # The template carries the swap buffers and aio tuning; offload_frozen adds nothing it lacks.
    for extra in ([], ["deepspeed.offload_frozen=true"]):
        ds = build_ds_config(_cfg("deepspeed.config=zero3_offload_nvme", *nvme, *extra), world_size=1, on_cuda=True)
        assert ds["zero_optimization"]["offload_param"] == {
            "device": "nvme", "pin_memory": True, "buffer_count": 16, "buffer_size": 100_000_000,
            "max_in_cpu": 1_000_000_000, "nvme_path": str(tmp_path)}
        assert ds["aio"]["block_size"] == 1 << 20 and ds["zero_force_ds_cpu_optimizer"] is False
        parsed = DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's own schema accepts it
        assert parsed.offload_param.device == "nvme" and str(parsed.offload_param.nvme_path) == str(tmp_path)


@pytest.mark.parametrize("sets, fragment", [
    (["deepspeed.config=zero3_offload_nvme"],
     "deepspeed.offload_device: cpu contradicts the template 'zero3_offload_nvme', which offloads parameters to nvme"),
    (["deepspeed.config=zero3_offload", "deepspeed.offload_device=nvme", "deepspeed.nvme_path=TMP"],
     "deepspeed.offload_device: nvme contradicts the template 'zero3_offload', which offloads parameters to cpu"),
    (["deepspeed.offload_device=nvme", "deepspeed.nvme_path=TMP"],
     "deepspeed.offload_device: nvme offloads nothing without deepspeed.offload_frozen=true"),
    (["deepspeed.offload_frozen=true", "deepspeed.offload_device=nvme", "deepspeed.nvme_path=TMP/missing"],
     "deepspeed.nvme_path: TMP/missing is not a writable directory"),
])
def test_nvme_offload_contradictions_refused(async_io, tmp_path, sets, fragment):
    sets = [s.replace("TMP", str(tmp_path)) for s in sets]
    with pytest.raises(ConfigError, match=fragment.replace("TMP", str(tmp_path))):
        build_ds_config(_cfg(*sets), world_size=1, on_cuda=False)


@pytest.mark.parametrize("sets, fragment", [
    (["deepspeed.offload_device=nvme"], "deepspeed.nvme_path: required for deepspeed.offload_device=nvme"),
    (["deepspeed.offload_device=nvme", "deepspeed.nvme_path=/x", "deepspeed.config=zero2", "deepspeed.zero_stage=2"],
     "deepspeed.offload_device: nvme needs deepspeed.zero_stage=3, got 2"),
    (["deepspeed.offload_device=disk"], "deepspeed.offload_device: 'disk' is not one of cpu, nvme"),
])
def test_nvme_offload_keys_checked_at_load(sets, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _cfg(*sets)


def test_nvme_offload_refused_where_async_io_cannot_build(async_io, tmp_path):
    async_io["available"] = False
    with pytest.raises(ConfigError, match="deepspeed.offload_device: nvme needs DeepSpeed's async-I/O op, which "
                                          "cannot be built here"):
        build_ds_config(_cfg("deepspeed.offload_frozen=true", "deepspeed.offload_device=nvme",
                             f"deepspeed.nvme_path={tmp_path}"), world_size=1, on_cuda=False)


@pytest.mark.parametrize("setting, on_cuda, fused", [("auto", False, False), ("auto", True, True),
                                                     ("on", False, True), ("off", True, False)])
def test_fused_adamw_choice(setting, on_cuda, fused):
    from blip_train.training.engine import build_optimizer

    cfg = load_config(None, ["data.train=[{local: d}]", f"optim.fused={setting}"])
    opt = build_optimizer(nn.Linear(3, 2), cfg, on_cuda=on_cuda)
    assert bool(opt.defaults["fused"]) is fused
    if not on_cuda:  # the CPU kernel exists and steps
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
