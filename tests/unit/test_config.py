"""Config tree: key snapshot, strict parsing, overrides, validation messages, recipes."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from blip_train.config import (ConfigError, ExperimentConfig, config_from_dict, load_config, resolve_recipe,
                               save_resolved_config)
from blip_train.config.loading import RECIPES_DIR
from tests.conftest import REPO, clean_env


def _keys(cls, prefix=""):
    out = []
    for f in dataclasses.fields(cls):
        tp = f.type if not isinstance(f.type, str) else eval(f.type, vars(sys.modules[cls.__module__]))
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def test_key_snapshot():
    """The config surface is deliberate: a new knob shows up as a reviewed change to this list."""
    assert _keys(ExperimentConfig) == [
        "run.output_dir", "run.seed", "run.device", "run.tensorboard", "run.wandb", "run.wandb_project", "run.memory_trace",
        "model.arch", "model.qformer_text_input", "model.video_frames", "model.modality", "model.modality_prefix",
        "model.attention", "model.embed_dim", "model.max_txt_len", "model.init_from",
        "model.objective",
        "model.vision.image_size", "model.vision.patch_size", "model.vision.width", "model.vision.layers",
        "model.vision.drop_last_block", "model.vision.final_norm", "model.vision.heads", "model.vision.mlp_dim", "model.vision.layer_norm_eps",
        "model.vision.weights", "model.vision.frozen", "model.vision.precision", "model.vision.grad_checkpointing",
        "model.vision.drop_path_rate",
        "model.qformer.hidden_size", "model.qformer.layers", "model.qformer.heads", "model.qformer.intermediate_size",
        "model.qformer.vocab_size", "model.qformer.max_position_embeddings", "model.qformer.cross_attention_freq",
        "model.qformer.num_query_tokens", "model.qformer.layer_norm_eps", "model.qformer.dropout",
        "model.qformer.bert_init", "model.qformer.tokenizer", "model.qformer.grad_checkpointing",
        "model.text.hidden_size", "model.text.layers", "model.text.heads", "model.text.intermediate_size",
        "model.text.vocab_size", "model.text.max_position_embeddings", "model.text.layer_norm_eps", "model.text.dropout",
        "model.text.fusion_layer", "model.text.decoder", "model.text.tokenizer", "model.text.bert_init",
        "model.text.grad_checkpointing", "model.text.prompt",
        "model.llm.path", "model.llm.dtype", "model.llm.prompt", "model.llm.max_txt_len", "model.llm.max_prompt_len",
        "model.llm.lora.r", "model.llm.lora.alpha", "model.llm.lora.dropout", "model.llm.lora.target_modules",
        "model.audio.encoder", "model.audio.segments", "model.points.encoder", "model.points.num_points",
        "model.momentum.decay", "model.momentum.queue_size", "model.momentum.alpha", "model.momentum.alpha_ramp_steps",
        "data.train", "data.val", "data.balance", "data.image_size", "data.crop_scale_min", "data.hflip",
        "data.num_workers", "data.decode", "data.shuffle_seed", "data.num_canonical_nodes", "data.cache_dir", "data.cache_limit",
        "data.keep_cache",
        "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.warmup_start_lr", "optim.weight_decay",
        "optim.betas", "optim.eps", "optim.grad_clip", "optim.fused", "optim.schedule", "optim.decay_rate",
        "optim.decay_steps", "optim.layer_decay",
        "train.max_steps", "train.micro_batch_size", "train.grad_accum_steps", "train.global_batch_size",
        "train.log_interval", "train.save_interval", "train.keep_last", "train.keep_every", "train.max_bad_steps",
        "eval.interval", "eval.task", "eval.k_test", "eval.answer_list", "eval.batch_size", "eval.max_samples", "eval.num_beams", "eval.max_new_tokens",
        "eval.min_new_tokens", "eval.length_penalty", "eval.vqa_prompt", "eval.vqa_max_new_tokens",
        "eval.vqa_length_penalty",
        "deepspeed.config", "deepspeed.zero_stage", "deepspeed.precision", "deepspeed.offload_frozen",
        "deepspeed.offload_device", "deepspeed.nvme_path",
        "deepspeed.param_persistence_threshold", "deepspeed.max_live_parameters", "deepspeed.max_reuse_distance",
        "deepspeed.prefetch_bucket_size", "deepspeed.zero_init", "deepspeed.timeout_minutes",
    ]


def test_design_contract_keys_exist():
    cfg = load_config(None, ["run.output_dir=x", "run.seed=1", "train.max_steps=2", "train.save_interval=1",
                             "train.log_interval=1", "data.train=[{local: d}]"])
    assert cfg.run.output_dir == "x" and cfg.train.max_steps == 2 and cfg.data.train[0].local == "d"


@pytest.mark.parametrize("override, fragment", [
    (["train.max_stepz=3"], "unknown key train.max_stepz"),
    (["model.qformer.num_query_tokens=0"], "model.qformer.num_query_tokens: must be > 0"),
    (["model.qformer.num_query_tokens=-4"], "model.qformer.num_query_tokens"),
    (["train.max_steps=ten"], "train.max_steps: expected an integer"),
    (["deepspeed.precision=fp16"], "deepspeed.precision: fp16 needs a CUDA device"),
    (["model.attention=flash"], "model.attention: flash needs a CUDA device"),
    (["model.attention=fast"], "model.attention: 'fast' is not one of auto, flash, sdpa, math"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: 4 is not one of"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["data.train=[{path: x}]"], "unknown key data.train[0].path"),
    (["model.arch=stage2"], "model.llm.path: required"),
    (["run.tensorboard=maybe"], "run.tensorboard: expected true/false"),
    (["data.image_size=64"], "data.image_size: 64 differs from model.vision.image_size"),
    (["eval.interval=5"], "eval.interval: in-training evaluation needs data.val"),
    (["eval.task=vqa"], "eval.task: vqa needs model.arch in stage2, instruct, blip, this run is model.arch=stage1"),
    (["model.qformer_text_input=true"], "model.qformer_text_input: needs model.arch=stage2"),
    (["model.arch=stage2", "model.llm.path=x", "model.qformer_text_input=true", "model.llm.prompt=a photo of"],
     "model.llm.prompt: 'a photo of' must hold one '{}'"),
    (["model.arch=stage2", "model.llm.path=x", "model.qformer_text_input=true", "model.llm.prompt='Q: {} A:'",
      "eval.task=caption"], "eval.task: caption needs a captioning model"),
    (["eval.vqa_prompt='Question: answer'"], "eval.vqa_prompt: 'Question: answer' must hold one '{}'"),
    (["eval.min_new_tokens=40"], "eval.min_new_tokens: 40 exceeds eval.max_new_tokens=30"),
    (["eval.vqa_max_new_tokens=0"], "eval.vqa_max_new_tokens: must be > 0"),
    (["eval.task=captions"], "eval.task: 'captions' is not one of auto, retrieval, caption, vqa"),
    (["optim.fused=sometimes"], "optim.fused: 'sometimes' is not one of auto, on, off"),
    (["optim.schedule=step"], "optim.decay_steps: must be > 0"),
    (["model.arch=blip"], "model.vision.frozen: model.arch=blip trains its ViT end to end"),
    (["model.arch=albef", "model.vision.frozen=false", "model.momentum.queue_size=10", "train.micro_batch_size=4"],
     "model.momentum.queue_size: 10 is not a multiple of train.micro_batch_size=4"),
    (["model.arch=blip", "model.vision.frozen=false", "model.momentum.decay=1"], "model.momentum.decay: must be in [0, 1)"),
    (["model.arch=blip", "model.vision.frozen=false", "deepspeed.offload_frozen=true"],
     "deepspeed.offload_frozen: model.arch=blip has no frozen tower to offload"),
    (["model.vision.frozen=false", "optim.layer_decay=0"], "optim.layer_decay: must be in (0, 1]"),
    (["model.vision.frozen=false", "optim.layer_decay=1.5"], "optim.layer_decay: must be in (0, 1]"),
    (["optim.layer_decay=0.9"], "optim.layer_decay: 0.9 decays the lr of a training ViT, but model.vision.frozen"),
    (["model.vision.frozen=false", "model.vision.drop_path_rate=1"], "model.vision.drop_path_rate: must be in [0, 1)"),
    (["model.vision.frozen=false", "model.vision.drop_path_rate=-0.1"], "model.vision.drop_path_rate: must be in"),
    (["model.vision.drop_path_rate=0.1"], "model.vision.drop_path_rate: 0.1 needs a training ViT"),
    (["model.llm.lora.r=-1"], "model.llm.lora.r: must be >= 0"),
    (["model.llm.lora.r=4"], "model.llm.lora.r: stage 1 has no LLM to adapt"),
    (["model.arch=stage2", "model.llm.path=x", "model.llm.lora.r=4", "model.llm.lora.dropout=1"],
     "model.llm.lora.dropout: must be in [0, 1)"),
    (["model.arch=stage2", "model.llm.path=x", "model.llm.lora.r=4", "model.llm.lora.alpha=0"],
     "model.llm.lora.alpha: must be > 0"),
])
def test_bad_configs_refused_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_override_types_and_numbers_from_yaml_strings():
    cfg = load_config(None, ["optim.lr=3e-4", "optim.betas=[0.9, 0.999]", "run.tensorboard=false"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == [0.9, 0.999] and cfg.run.tensorboard is False
    assert config_from_dict({"optim": {"lr": "1e-5"}}).optim.lr == pytest.approx(1e-5)


def test_bare_on_off_reach_optim_fused_as_words():
    # YAML reads unquoted on/off as booleans; for this key they mean the words
    assert load_config(None, ["optim.fused=off"]).optim.fused == "off"
    assert config_from_dict({"optim": {"fused": True}}).optim.fused == "on"
    with pytest.raises(ConfigError, match="model.vision.weights: expected a string, got True"):
        config_from_dict({"model": {"vision": {"weights": True}}})  # only where on/off are values


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(RECIPES_DIR))[:-5] for p in RECIPES_DIR.rglob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    """Loads, and its DeepSpeed JSON builds at the world size its global batch implies (CUDA assumed)."""
    from blip_train.training.engine import build_ds_config

    cfg = load_config(recipe)
    assert cfg.train.max_steps > 0
    t = cfg.train
    world = t.global_batch_size // (t.micro_batch_size * t.grad_accum_steps) if t.global_batch_size else 2
    ds = build_ds_config(cfg, world, on_cuda=True)
    assert ds["train_batch_size"] == t.micro_batch_size * t.grad_accum_steps * world
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ConfigError, match="no such recipe"):
        resolve_recipe("nope/never")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "data.train=[{local: a, proportion: 0.5}]"])
    save_resolved_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_train_entry_point_refuses_bad_key_before_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "blip_train.train", "--config", "blip2_stage1_vitg",
                        "--set", "train.micro_batch_sz=4", "--set", f"run.output_dir={tmp_path}/out"],
                       env=clean_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("config error: unknown key train.micro_batch_sz")
    assert not (tmp_path / "out").exists()


FINE_TUNING = {  # recipe: (image size, global batch, layer decay, VQA prompt or caption prompt)
    "blip2_ft_caption_coco_opt2.7b": (364, 256, 1.0, "a photo of"),
    "blip2_ft_caption_coco_flant5xl": (364, 256, 0.95, "a photo of"),
    "blip2_ft_vqav2_opt2.7b": (490, 128, 0.95, "Question: {} Answer:"),
    "blip2_ft_vqav2_flant5xl": (490, 128, 0.9, "Question: {} Short answer:"),
    "blip2_ft_retrieval_coco_vitg": (364, 224, 0.95, ""),
}


@pytest.mark.parametrize("recipe", sorted(FINE_TUNING))
def test_fine_tuning_recipes_carry_the_paper_settings(recipe):
    """BLIP-2's fine-tuning tables: ViT trained, 1e-5 with 1000 warmup, the table's resolution, batch and
    prompt, layer decay, the evaluation protocol."""
    size, batch, decay, prompt = FINE_TUNING[recipe]
    cfg = load_config(recipe)
    text = (RECIPES_DIR / f"{recipe}.yaml").read_text()
    assert "BLIP-2 paper" in text and "Hyperparameters for fine-tuning BLIP-2" in text
    assert cfg.model.vision.frozen is False and cfg.model.vision.image_size == cfg.data.image_size == size
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (1e-5, 0.0, 1000, 0.05)
    assert cfg.train.global_batch_size == batch and cfg.model.init_from
    assert (cfg.optim.layer_decay, cfg.model.vision.drop_path_rate) == (decay, 0.0)
    e = cfg.eval
    if "retrieval" in recipe:
        assert cfg.model.arch == "stage1" and e.k_test == 128 and e.task == "retrieval"
    elif "vqa" in recipe:
        assert cfg.model.arch == "stage2" and cfg.model.qformer_text_input and cfg.model.llm.prompt == prompt
        penalty = 0.0 if "opt" in recipe else -1.0  # LAVIS: blip2_opt answers with 0, blip2_t5 with -1
        assert (e.task, e.num_beams, e.vqa_max_new_tokens, e.vqa_length_penalty) == ("vqa", 5, 10, penalty)
    else:
        assert cfg.model.arch == "stage2" and not cfg.model.qformer_text_input and cfg.model.llm.prompt == prompt
        assert (e.task, e.num_beams, e.min_new_tokens, e.max_new_tokens) == ("caption", 5, 8, 30)


def test_the_queue_must_take_whole_global_micro_batches():
    from blip_train.config.validate import check_queue_fits_world
    cfg = load_config(None, ["model.arch=blip", "model.vision.frozen=false", "model.momentum.queue_size=96",
                             "train.micro_batch_size=8"])
    check_queue_fits_world(cfg, 4)  # 96 = 3 x (8 x 4)
    with pytest.raises(ConfigError, match=r"model.momentum.queue_size: 96 is not a multiple of the 40 features"):
        check_queue_fits_world(cfg, 5)
