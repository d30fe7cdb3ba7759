"""`make scale`: every paper recipe at its true dimensions on this machine, 2 ranks, ZeRO-3 — memory per rank
against the analytic ZeRO-3 minimum, load and step time, checkpoint bytes, and the tools at real size.

    python bench/scale.py                              # every recipe (hours on a 2-core CPU machine)
    python bench/scale.py --recipes blip2_stage1_vitg,blip2_stage2_opt2.7b
    python bench/scale.py --list                       # the recipes, their sizes and what fits here

Random towers are built from the real configurations (EVA ViT-g/L, BERT-base, OPT, FlanT5, Vicuna/LLaMA, with
their real vocabularies) and saved in the formats real weights come in: the EVA state dict as LAVIS ships it
(fp16 .pth; ViT-L as safetensors), HF folders with safetensors shards and tokenizer files. Each recipe then runs
unchanged except for what a CPU needs (run.device=cpu, micro-batch 2, its data replaced by a small synthetic
split, 2 steps): train and save, `tools/zero_to_safetensors.py`, resume for one more step, `tools/export_hf.py`.

Memory: each rank records its resident memory at every phase (run.memory_trace). The analytic minimum per
rank is what ZeRO-3 cannot avoid holding, divided over the ranks: the frozen towers in their dtype, and per
trainable parameter its 16-bit weight and gradient, the fp32 master and gradient, and Adam's two fp32
moments (20 bytes). The target is a peak of at most 1.3 x (minimum + the process's baseline, its RSS once
torch, DeepSpeed and the process group are up, before any model is built).

A recipe whose full size cannot fit in this machine's memory at that target runs at its real width with as
many LLM layers as fit, and the table says so with the arithmetic. Prints a table and one JSON line; the raw
results go to OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from the repo root

from bench.common import print_markdown_table  # noqa: E402

GIB = 2**30
BYTES_PER_TRAINABLE = 2 + 2 + 4 + 4 + 8
"""bf16 weight + bf16 gradient + fp32 master + fp32 gradient partition + Adam's two fp32 moments."""
TARGET_RATIO = 1.3
WORLD = 2
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Public configurations of the released models (facts; the weights here are random).
LLMS = {
    "opt-2.7b": dict(family="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560),
    "opt-6.7b": dict(family="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096),
    "flan-t5-xl": dict(family="t5", d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                       num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False),
    "flan-t5-xxl": dict(family="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                        num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False),
    "vicuna-7b": dict(family="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=2048, rms_norm_eps=1e-6),
    "vicuna-13b": dict(family="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       max_position_embeddings=2048, rms_norm_eps=1e-6),
}
LAYER_KEYS = {"opt": ("num_hidden_layers",), "llama": ("num_hidden_layers",), "t5": ("num_layers", "num_decoder_layers")}


@dataclass
class Recipe:
    name: str
    vit: str
    """g | l"""
    llm: Optional[str] = None
    paper_trainable: float = 188e6
    """Trainable parameters the paper reports (the Q-Former with its queries, 188M; + ViT-g when fine-tuning)."""
    llm_layers: Optional[int] = None
    """LLM layers built here (None: all); set when the full size cannot fit this machine."""


RECIPES = [
    Recipe("blip2_stage1_vitg", "g"),
    Recipe("blip2_stage1_vitl", "l"),
    Recipe("blip2_stage2_opt2.7b", "g", "opt-2.7b"),
    Recipe("blip2_stage2_flant5xl", "g", "flan-t5-xl"),
    Recipe("instructblip_flant5xl", "g", "flan-t5-xl"),
    Recipe("instructblip_vicuna7b", "g", "vicuna-7b"),
    Recipe("blip2_stage2_opt6.7b", "g", "opt-6.7b"),
    Recipe("blip2_stage2_flant5xxl", "g", "flan-t5-xxl"),
    Recipe("instructblip_flant5xxl", "g", "flan-t5-xxl"),
    Recipe("instructblip_vicuna13b", "g", "vicuna-13b"),
    # Fine-tuning trains the ViT too (1B more trainable parameters at 20 bytes each).
    Recipe("blip2_ft_retrieval_coco_vitg", "g", paper_trainable=1.17e9),
    Recipe("blip2_ft_caption_coco_opt2.7b", "g", "opt-2.7b", paper_trainable=1.1e9),
    Recipe("blip2_ft_caption_coco_flant5xl", "g", "flan-t5-xl", paper_trainable=1.1e9),
    Recipe("blip2_ft_vqav2_opt2.7b", "g", "opt-2.7b", paper_trainable=1.1e9),
    Recipe("blip2_ft_vqav2_flant5xl", "g", "flan-t5-xl", paper_trainable=1.1e9),
]


# ----------------------------------------------------------------------------------------- memory model

@dataclass
class Footprint:
    trainable: int
    frozen_bytes: int
    frozen: int = 0

    def minimum_per_rank(self, world: int = WORLD) -> float:
        """Bytes per rank ZeRO-3 cannot avoid: everything partitioned, nothing gathered."""
        return (self.frozen_bytes + BYTES_PER_TRAINABLE * self.trainable) / world


def analytic_minimum_gib(trainable: int, frozen_bytes: int, world: int = WORLD) -> float:
    return Footprint(trainable, frozen_bytes).minimum_per_rank(world) / GIB


def target_gib(minimum_gib: float, baseline_gib: float) -> float:
    return TARGET_RATIO * (minimum_gib + baseline_gib)


def layers_that_fit(per_layer_bytes: int, fixed_bytes: float, layers: int, budget_bytes: float) -> int:
    """Most LLM layers (at most `layers`) whose frozen bytes, on top of `fixed_bytes`, stay within the budget."""
    if fixed_bytes + per_layer_bytes * layers <= budget_bytes:
        return layers
    return max(0, int((budget_bytes - fixed_bytes) // per_layer_bytes))


# ----------------------------------------------------------------------------------------- towers

def model_config(recipe: str):
    from blip_train.config import load_config
    return load_config(recipe).model


def count_footprint(recipe: Recipe, llm_layers: Optional[int] = None) -> tuple[Footprint, dict]:
    """Trainable and frozen parameters of the recipe's model, counted on the meta device (nothing allocated)."""
    import torch

    from blip_train.models.llm_bridge import Blip2LLM
    from blip_train.models.stage1 import Blip2Stage1

    m = model_config(recipe.name)
    m.vision.weights = m.qformer.bert_init = m.init_from = ""
    with torch.device("meta"):
        if recipe.llm is None:
            model = Blip2Stage1(m, device_type="cpu")
        else:
            llm = build_hf_llm(recipe.llm, llm_layers, meta=True)
            model = Blip2LLM(m, llm, device_type="cpu")
    parts: dict = {}
    trainable = frozen = frozen_bytes = 0
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if p.requires_grad:
            trainable += p.numel()
            parts.setdefault(top, [0, 0])[0] += p.numel()
        else:
            frozen += p.numel()
            parts.setdefault(top, [0, 0])[1] += p.numel()
            # The dtypes training holds the towers in: the ViT in model.vision.precision (fp16 -> bf16 on a
            # CPU), the LLM in model.llm.dtype.
            dtype = m.vision.precision if top == "visual_encoder" else m.llm.dtype
            frozen_bytes += p.numel() * DTYPE_BYTES[dtype]
    return Footprint(trainable, frozen_bytes, frozen), parts


def build_hf_llm(name: str, layers: Optional[int], meta: bool = False, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, OPTConfig, T5Config

    spec = dict(LLMS[name])
    family = spec.pop("family")
    if layers is not None:
        for key in LAYER_KEYS[family]:
            spec[key] = layers
    cfg = {"opt": OPTConfig, "llama": LlamaConfig, "t5": T5Config}[family](**spec)
    if family == "opt":
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 2, 2, 1
    elif family == "llama":
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 3
    else:
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = 0, 1, 0
    cls = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(cfg, dtype=dtype or torch.bfloat16)
    if not meta:
        model.to_empty(device="cpu")
        fill_random_(model)
    return model


def fill_random_(module) -> None:
    """Weights drawn as a trained model's look (normal 0.02), norms at one, biases at zero: in place, bf16."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def save_random_hf_folder(name: str, layers: Optional[int], folder: Path, dtype, shard_bytes: int = 2 * GIB) -> None:
    """An HF folder (config.json, sharded model-*.safetensors + index) of random weights, written tensor by
    tensor: a 13B model never exists whole in memory. Tied weights are written once, as save_pretrained does."""
    import torch
    from safetensors.torch import save_file

    model = build_hf_llm(name, layers, meta=True, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    shards: list[dict] = [{}]
    size = 0
    for key, p in model.named_parameters():  # shared parameters once, under their first name
        nbytes = p.numel() * p.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = p
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, p in shard.items():
            t = torch.empty(p.shape, dtype=dtype)
            if t.ndim >= 2:
                t.normal_(0.0, 0.02)
            else:
                t.zero_() if key.endswith("bias") else t.fill_(1.0)
            tensors[key] = t
            weight_map[key] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def texts_for_tokenizers() -> list[str]:
    words = ("a photo of a red square next to two small blue circles on the left of a green triangle "
             "question answer what color shape how many is there short the image shows").split()
    return [" ".join(words[i:i + 7]) for i in range(len(words) - 6)] * 4


def make_towers(towers: Path, recipe: Recipe, log) -> dict:
    """The recipe's towers under `towers`, in their release formats; built once and reused."""
    import torch
    from safetensors.torch import save_file

    from blip_train.data.tokenizers import train_bpe_tokenizer, train_wordpiece_tokenizer
    from blip_train.models.eva_vit import EVAViT

    out: dict = {}
    m = model_config(recipe.name)
    vit_file = towers / ("eva_vit_g.pth" if recipe.vit == "g" else "vit_l.safetensors")
    if not vit_file.exists():
        t0 = time.time()
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in EVAViT(m.vision).state_dict().items()}
        sd = {}
        for k, shape in shapes.items():  # fp16 as LAVIS ships eva_vit_g.pth
            t = torch.empty(shape, dtype=torch.float16)
            t.normal_(0.0, 0.02) if len(shape) >= 2 or k in ("cls_token", "pos_embed") else (
                t.zero_() if "bias" in k else t.fill_(1.0))
            sd[k] = t
        vit_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = vit_file.with_suffix(".tmp")
        if vit_file.suffix == ".pth":
            torch.save({"model": sd}, tmp)
        else:
            save_file(sd, str(tmp))
        tmp.replace(vit_file)
        log(f"towers: {vit_file.name} ({vit_file.stat().st_size / GIB:.2f} GiB) in {time.time() - t0:.0f}s")
        del sd
    out["vit"] = vit_file
    bert = towers / "bert-base-uncased"
    if not (bert / "model.safetensors").exists():
        from transformers import BertConfig, BertForMaskedLM
        train_wordpiece_tokenizer(texts_for_tokenizers(), vocab_size=200, out_dir=bert)
        with torch.device("meta"):
            model = BertForMaskedLM(BertConfig())  # bert-base-uncased: 12 x 768, vocab 30522
        model.to_empty(device="cpu")
        fill_random_(model)
        model.save_pretrained(str(bert), safe_serialization=True)
        log(f"towers: random bert-base-uncased → {bert}")
    out["bert"] = bert
    if recipe.llm is not None:
        suffix = f"-{recipe.llm_layers}layers" if recipe.llm_layers is not None else ""
        folder = towers / f"{recipe.llm}{suffix}"
        if not (folder / ".complete").exists():
            t0 = time.time()
            family = LLMS[recipe.llm]["family"]
            save_random_hf_folder(recipe.llm, recipe.llm_layers, folder,
                                  torch.float32 if m.llm.dtype == "fp32" else torch.bfloat16)
            train_bpe_tokenizer(texts_for_tokenizers(), vocab_size=300, out_dir=folder, style=family)
            (folder / ".complete").write_text("")
            log(f"towers: random {recipe.llm}{suffix} → {folder} in {time.time() - t0:.0f}s")
        out["llm"] = folder
    return out


def make_data(root: Path) -> Path:
    from blip_train.data.synthetic import write_synthetic_dataset
    data = root / "data"
    if not (data / "val").is_dir():
        write_synthetic_dataset(data, num_samples=80, seed=0, val_fraction=0.25, image_size=224, overwrite=True)
    return data


# ----------------------------------------------------------------------------------------- running

class PeakSampler:
    """Peak RSS of a process tree (VmHWM of each process, polled), for the tools (which trace nothing)."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, frontier = [self.pid], [self.pid]
        while frontier:
            p = frontier.pop()
            try:
                kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            except OSError:
                continue
            pids += [int(k) for k in kids]
            frontier += [int(k) for k in kids]
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self._tree():
                try:
                    for line in Path(f"/proc/{p}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                except OSError:
                    pass
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 2**20


def run_logged(cmd: list[str], log_file: Path, env: dict, timeout: int, started: Optional[list] = None
               ) -> tuple[float, float]:
    """Run `cmd` (output to log_file); returns (seconds, peak RSS GiB of its busiest process). `started`
    gets the launch time appended."""
    t0 = time.time()
    if started is not None:
        started.append(t0)
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = PeakSampler(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            peak = sampler.stop()
    if rc != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{cmd[:4]}... exited {rc}; end of {log_file}:\n{tail}")
    return time.time() - t0, peak


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # the project sets its own
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    return env


def free_port() -> int:
    from blip_train.distributed.env import free_port as _free
    return _free()


def summarise_trace(run_dir: Path, world: int = WORLD) -> dict:
    """Over the ranks: the baseline (RSS at start), the peak, the phases that raised the high-water mark by
    more than 50 MiB (phase group -> the peak it raised it to), build/engine seconds and the median step."""
    from blip_train.training.host_memory import read_memory_trace

    groups = {"start": "baseline", "built": "build+load", "engine": "engine", "resumed": "resume",
              "data": "data", "forward": "forward", "backward": "backward", "step": "optimizer", "saved": "save"}
    out: dict = {"high_water_gib": {}, "baseline_gib": 0.0, "peak_gib": 0.0}
    step_times = []
    for r in range(world):
        trace = read_memory_trace(run_dir / "memory" / f"rank{r}.jsonl")
        prev = 0.0
        for m in trace:
            if m["peak_gib"] - prev > 0.05:
                g = groups[m["phase"]]
                out["high_water_gib"][g] = max(out["high_water_gib"].get(g, 0.0), m["peak_gib"])
            prev = max(prev, m["peak_gib"])
        out["baseline_gib"] = max(out["baseline_gib"], trace[0]["rss_gib"])
        out["start_wall"] = max(out.get("start_wall", 0.0), trace[0].get("wall", 0.0))
        out["peak_gib"] = max(out["peak_gib"], prev)
        t = {m["phase"]: m["t"] for m in trace if m["phase"] in ("start", "built", "engine", "resumed")}
        out.setdefault("build_s", round(t["built"] - t["start"], 1))
        out.setdefault("engine_s", round(t["engine"] - t["built"], 1))
        starts = [m["t"] for m in trace if m["phase"] == "data"]
        ends = [m["t"] for m in trace if m["phase"] == "step"]
        step_times += [b - a for a, b in zip(starts, ends)]
    out["step_s"] = round(sorted(step_times)[len(step_times) // 2], 2) if step_times else None
    return out


def du_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB


def run_recipe(root: Path, recipe: Recipe, towers: dict, data: Path, log, sets: list[str], res: dict,
               nvme: Optional[Path] = None) -> None:
    """Train + save, consolidate, resume one step, export; fills `res` as it goes (kept when a step fails).
    nvme: every ZeRO-3 partition swapped to files in this directory, one step of micro-batch 1 and no tools
    (the point is the step of a recipe whose towers do not fit in memory)."""
    run_dir = root / "runs" / recipe.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    logf = run_dir.parent / f"{recipe.name}.log"
    logf.write_text("")
    init_from = ""
    stage1 = root / "runs" / "blip2_stage1_vitg"
    if recipe.llm is not None and (stage1 / "checkpoints").is_dir() and recipe.vit == "g":
        init_from = str(stage1)  # a stage-1 checkpoint at real size, as the recipes chain them
    overrides = [
        f"run.output_dir={run_dir}", "run.device=cpu", "run.tensorboard=false", "run.memory_trace=true",
        f"model.vision.weights={towers['vit']}", f"model.qformer.tokenizer={towers['bert']}",
        f"model.qformer.bert_init={towers['bert']}", f"model.init_from={init_from}",
        f"data.train=[{{local: {data / 'train'}, name: synthetic}}]", f"data.val={data / 'val'}",
        "data.num_workers=1", "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.global_batch_size=0",
        "train.max_steps=2", "train.save_interval=2", "train.log_interval=1", "eval.interval=0",
        "optim.warmup_steps=1",
        # The recipes' optim.fused=auto picks the fused AdamW on a GPU; on a CPU only `on` does, and without it
        # the step's full-size temporaries (0.7 GiB per rank for stage 1) would be measured, not the GPU's.
        "optim.fused=on",
    ] + sets
    if recipe.llm is not None:
        overrides.append(f"model.llm.path={towers['llm']}")
    if nvme is not None:
        shutil.rmtree(nvme, ignore_errors=True)
        nvme.mkdir(parents=True)
        overrides += ["deepspeed.config=zero3_offload_nvme", "deepspeed.offload_frozen=true",
                      "deepspeed.offload_device=nvme", f"deepspeed.nvme_path={nvme}", "train.micro_batch_size=1",
                      "train.max_steps=1", "train.save_interval=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), "-m", "blip_train.train", "--config", recipe.name]
    for s in overrides:
        cmd += ["--set", s]
    env = child_env()
    res.update(llm_layers=recipe.llm_layers, init_from=init_from or None)
    log(f"{recipe.name}: training 2 steps on {WORLD} ranks")
    launched: list = []
    res["train_s"], _ = run_logged(cmd, logf, env, timeout=3600, started=launched)
    res["train"] = summarise_trace(run_dir)
    res["train"]["startup_s"] = round(res["train"]["start_wall"] - launched[0], 1)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    res["checkpoint_gib"] = round(du_gib(ckpts[-1]), 3)
    if nvme is not None:
        res["nvme_gib"] = round(du_gib(nvme), 3)
        shutil.rmtree(nvme, ignore_errors=True)
        return
    log(f"{recipe.name}: zero_to_safetensors")
    weights = root / "weights" / recipe.name
    shutil.rmtree(weights, ignore_errors=True)
    res["z2s_s"], res["z2s_peak_gib"] = run_logged(
        [sys.executable, "tools/zero_to_safetensors.py", "--checkpoint", str(run_dir), "--out", str(weights)],
        logf, env, timeout=1800)
    res["weights_gib"] = round(du_gib(weights), 3)
    log(f"{recipe.name}: resuming for one more step")
    # Extending a run is a meaning change the trainer refuses unless asked.
    cmd_resume = [c if not c.startswith("train.max_steps=") else "train.max_steps=3" for c in cmd]
    cmd_resume.append("--allow-config-change")
    cmd_resume[cmd_resume.index("--master_port") + 1] = str(free_port())
    (run_dir / "memory").rename(run_dir / "memory_first")
    res["resume_s"], _ = run_logged(cmd_resume, logf, env, timeout=3600)
    res["resume"] = summarise_trace(run_dir)
    res["resumed_to"] = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))[-1]
    log(f"{recipe.name}: export_hf")
    export = root / "exports" / recipe.name
    shutil.rmtree(export, ignore_errors=True)
    res["export_s"], res["export_peak_gib"] = run_logged(
        [sys.executable, "tools/export_hf.py", "--checkpoint", str(run_dir), "--out", str(export), "--dtype", "bf16"],
        logf, env, timeout=3600)
    res["export_gib"] = round(du_gib(export), 3)
    shutil.rmtree(export, ignore_errors=True)  # tens of GB at the larger sizes
    shutil.rmtree(weights, ignore_errors=True)


def machine_budget_bytes() -> float:
    """Memory the two ranks may use: MemAvailable now, less 2 GiB for the data workers and the tools."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 - 2 * GIB
    return 0.0


def plan(recipes: list[Recipe], baseline_gib: float, budget: float) -> list[tuple[Recipe, Footprint, str]]:
    """Each recipe at full size when its target fits the budget on 2 ranks, else at its real width with the
    LLM layers that fit (said plainly), or skipped with the arithmetic."""
    def need(fp: Footprint) -> float:  # bytes both ranks may reach at the target
        return WORLD * target_gib(fp.minimum_per_rank() / GIB, baseline_gib) * GIB

    planned = []
    for r in recipes:
        full, _ = count_footprint(r)
        if need(full) > budget and r.llm is None:
            planned.append((r, full, f"skipped: needs 2 x {need(full) / WORLD / GIB:.1f} GiB at the target, "
                                     f"{budget / GIB:.1f} GiB available"))
            continue
        if need(full) <= budget:
            planned.append((r, full, f"full size: 2 x {need(full) / WORLD / GIB:.1f} GiB at the target, "
                                     f"{budget / GIB:.1f} GiB available"))
            continue
        spec = LLMS[r.llm]
        layers = spec.get("num_hidden_layers", spec.get("num_layers"))
        one, two = count_footprint(r, 1)[0], count_footprint(r, 2)[0]
        per_layer = need(two) - need(one)  # every layer is the same size: the need is linear in layers
        fit = min(layers, int((budget - need(one)) // per_layer) + 1) if budget >= need(one) else 0
        why = (f"full size needs 2 x {need(full) / WORLD / GIB:.1f} GiB at the target, {budget / GIB:.1f} GiB "
               f"available; each of its {layers} LLM layers adds {per_layer / GIB:.2f} GiB")
        if fit < 1:
            planned.append((r, full, "skipped: " + why))
        else:
            planned.append((replace(r, llm_layers=fit), count_footprint(r, fit)[0],
                            f"real width, {fit} of {layers} LLM layers: " + why))
    return planned


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--towers", default="runs/scale/towers", help="where the random towers are built (reused)")
    p.add_argument("--recipes", default="", help="comma-separated recipe names (default: all)")
    p.add_argument("--list", action="store_true", help="print the plan (sizes, minimum, what fits) and stop")
    p.add_argument("--baseline-gib", type=float, default=0.95,
                   help="per-rank baseline assumed when planning (measured values are reported)")
    p.add_argument("--nvme", default="",
                   help="directory on a local disk: run the chosen recipes at full size with every ZeRO-3 partition "
                        "swapped there (deepspeed.offload_device=nvme), one step, no tools")
    p.add_argument("--budget-gib", type=float, default=0.0,
                   help="memory both ranks may use together (default: what the kernel reports available, less 2 GiB)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every run")
    args = p.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = sorted(set(names) - {r.name for r in RECIPES})
    if unknown:
        print(f"--recipes: unknown {unknown}; known: {', '.join(r.name for r in RECIPES)}", file=sys.stderr)
        return 2
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    chosen = [r for r in RECIPES if not names or r.name in names]
    if args.nvme:  # the towers live on disk: every recipe at full size
        planned = [(r, count_footprint(r)[0], f"full size, partitions swapped to {args.nvme}") for r in chosen]
    else:
        planned = plan(chosen, args.baseline_gib, args.budget_gib * GIB or machine_budget_bytes())
    for r, fp, why in planned:
        log(f"{r.name:<24} trainable {fp.trainable / 1e6:7.1f}M frozen {fp.frozen / 1e6:8.1f}M "
            f"minimum {fp.minimum_per_rank() / GIB:5.2f} GiB/rank — {why}")
    if args.list:
        return 0
    data = make_data(root)
    results_file = root / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for r, fp, why in planned:
        if why.startswith("skipped"):
            results[r.name] = {"recipe": r.name, "skipped": why}
            continue
        towers = make_towers(Path(args.towers), r, log)
        res: dict = {"recipe": r.name}
        try:
            run_recipe(root, r, towers, data, log, args.sets, res, Path(args.nvme) if args.nvme else None)
        except RuntimeError as e:
            log(f"{r.name}: FAILED — {str(e).splitlines()[0]}")
            res["failed"] = str(e)[-2000:]
        # Swapped to disk, the 16-bit weights and gradients leave memory: what must stay is the fp32 master,
        # its gradient and Adam's moments (16 bytes per trainable parameter).
        minimum = (16 * fp.trainable / WORLD) if args.nvme else fp.minimum_per_rank()
        res.update(plan=why, trainable=fp.trainable, frozen=fp.frozen, frozen_bytes=fp.frozen_bytes,
                   paper_trainable=r.paper_trainable, minimum_gib=round(minimum / GIB, 3))
        if "train" in res:
            base = res["train"]["baseline_gib"]
            res["target_gib"] = round(target_gib(res["minimum_gib"], base), 3)
            res["ratio_to_min_plus_baseline"] = round(res["train"]["peak_gib"] / (res["minimum_gib"] + base), 3)
            res["within_target"] = res["train"]["peak_gib"] <= res["target_gib"]
        results[r.name + (" (nvme)" if args.nvme else "")] = res
        results_file.write_text(json.dumps(results, indent=2))
    report(results)
    return 0


def report(results: dict) -> None:
    rows = []
    for name, r in results.items():
        if "train" not in r:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", "-", r.get("skipped") or "FAILED"])
            continue
        t = r["train"]
        phases = t["high_water_gib"]
        tools = (f"z2s {r['z2s_s']:.0f}s, resume→{r['resumed_to']}, export {r['export_s']:.0f}s" if "export_s" in r
                 else f"{r['nvme_gib']:.1f} GiB swapped to disk" if "nvme_gib" in r else "-")
        rows.append([
            name + (f" ({r['llm_layers']} LLM layers)" if r.get("llm_layers") else ""),
            f"{r['trainable'] / 1e6:.1f}M / {r['frozen'] / 1e6:.0f}M",
            f"{t.get('startup_s', 0):.0f} + {t['build_s']:.0f} + {t['engine_s']:.0f}",
            f"{t['step_s']:.1f}",
            f"{t['peak_gib']:.2f}",
            f"{r['minimum_gib']:.2f} + {t['baseline_gib']:.2f}",
            f"{r['ratio_to_min_plus_baseline']:.2f}x" + ("" if r["within_target"] else " (over 1.3)"),
            ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
            f"{r['checkpoint_gib']:.2f}",
            tools,
        ])
    print_markdown_table([["recipe", "trainable / frozen", "start-up + build + engine s", "step s", "peak GiB/rank",
                           "min + baseline", "peak / (min+base)", "high-water by phase (GiB)", "ckpt GiB",
                           "tools"]] + rows)
    line = {name: {k: r.get(k) for k in ("trainable", "frozen", "minimum_gib", "ratio_to_min_plus_baseline",
                                          "within_target", "checkpoint_gib", "llm_layers", "skipped")}
            | ({"peak_gib": r["train"]["peak_gib"], "baseline_gib": r["train"]["baseline_gib"],
                "step_s": r["train"]["step_s"]} if "train" in r else {}) for name, r in results.items()}
    print(json.dumps({"bench": "scale", "world": WORLD, "recipes": line}))


if __name__ == "__main__":
    sys.exit(main())
