"""`make demo`: the whole system end to end on this CPU machine, with results in runs/demo/summary.json.

    python -m blip_train.demo --out runs/demo
    python -m blip_train.demo --prepare      # only steps 1-2: what the demo recipes (demo/*) read

1. synthetic shapes dataset → runs/demo/data/{train,val} (MDS shards, tools/make_synthetic_dataset.py), and
   the fine-tuning split → runs/demo/data_ft/{train,val}: its own scenes, shapes plain or "striped"
2. assets: Q-Former tokenizer trained on the train captions; tiny ViT pretrained on the train split; the
   training answers as BLIP's VQA candidates (tools/answer_list.py)
3. each stage on 2 ranks, DeepSpeed ZeRO-3 bf16 over gloo (`torchrun -m blip_train.train`; BLIP, ALBEF and
   BLIP's VQA fine-tuning from the BLIP stage under ZeRO-2); last, two fine-tuning stages (trainable ViT with
   layer decay) on data_ft, from stage2_opt (captioning) and stage1 (retrieval)
4. held-out evaluation of every stage, trained vs untrained (`python -m blip_train.eval`), plus chance
5. summary.json as DESIGN.md §3 specifies
Steps whose outputs exist are reused, so a re-run after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from blip_train.distributed.env import free_port

REPO = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(cmd: list[str]) -> str:
    """Run a child command, stream its output, fail loudly; returns the output."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not any(noise in line for noise in ("[INFO]", "[WARNING]", "warnings.warn", "Warning:", "return func(")):
            print("    " + line, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"demo step failed (exit {proc.returncode}): {' '.join(cmd)}")
    return "".join(lines)


def last_json_line(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("expected a JSON line of metrics at the end of the output")


def make_data(out: Path, num_samples: int) -> Path:
    data = out / "data"
    if (data / "train").is_dir() and (data / "val").is_dir():
        log(f"data: reusing {data}")
        return data
    # --overwrite: a demo interrupted between the two splits regenerates both (same seed, same bytes)
    run([sys.executable, "tools/make_synthetic_dataset.py", "--out", str(data), "--num-samples", str(num_samples),
         "--seed", "0", "--val-fraction", "0.1", "--overwrite"])
    return data


def make_finetune_data(out: Path, num_samples: int = 1000) -> Path:
    """The fine-tuning split: new scenes whose shapes are plain or striped, the stripes named in the captions.
    The demo ViT is pretrained on runs/demo/data only, so stripes are what fine-tuning has to add; the
    earlier stages never read this split (their data and numbers do not depend on it)."""
    data = out / "data_ft"
    if (data / "train").is_dir() and (data / "val").is_dir():
        log(f"fine-tuning data: reusing {data}")
        return data
    run([sys.executable, "tools/make_synthetic_dataset.py", "--out", str(data), "--num-samples", str(num_samples),
         "--seed", "0", "--val-fraction", "0.2", "--patterns", "--overwrite"])
    return data


def make_assets(out: Path, data: Path, image_size: int) -> dict:
    """Q-Former tokenizer and the pretrained tiny ViT, in the formats real assets come in."""
    from streaming import StreamingDataset

    from blip_train.config import load_config
    from blip_train.data.tokenizers import train_wordpiece_tokenizer
    from blip_train.demo.pretrain import pretrain_vit

    import torch

    # Nothing else runs during asset pretraining: use every core (the training children get one each).
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    assets = out / "assets"
    info: dict = {}
    tok_dir = assets / "qformer_tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        ds = StreamingDataset(local=str(data / "train"), shuffle=False, batch_size=1)
        rows = [ds[i] for i in range(ds.num_samples)]
        texts = [r["caption"] for r in rows] + [r["question"] for r in rows]
        train_wordpiece_tokenizer(texts, vocab_size=400, out_dir=tok_dir)
        log(f"assets: Q-Former tokenizer trained on {len(texts)} train texts → {tok_dir}")
    answers = assets / "answer_list.json"
    if not answers.is_file():  # BLIP's VQA stage ranks over the training answers
        run([sys.executable, "tools/answer_list.py", "--data", str(data / "train"), "--top", "300", "--out",
             str(answers)])
    from blip_train.demo.llms import build_demo_llms
    info["llm_pretraining"] = build_demo_llms(str(data / "train"), assets, log=log)
    vit_file = assets / "vit.safetensors"
    if not vit_file.is_file():
        vcfg = load_config("demo/stage1").model.vision
        log("assets: pretraining the tiny ViT on train images (caption-word tagging)")
        info["vit_pretraining"] = pretrain_vit(vcfg, str(data / "train"), vit_file, log=log)
    return info


def train_stage(recipe: str, out: Path, name: str, extra: list[str]) -> dict:
    run_dir = out / name
    sets = [f"run.output_dir={run_dir}"] + extra
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "blip_train.train", "--config", recipe] + [a for s in sets for a in ("--set", s)])
    import yaml

    from blip_train.training.checkpoint import find_resume_tag, read_meta
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [h for h in history if "train/loss" in h]
    ckpt = run_dir / "checkpoints"
    tag = find_resume_tag(ckpt)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    elapsed = [h["time/elapsed_s"] for h in history if "time/elapsed_s" in h]
    return {"run_dir": str(run_dir), "steps": losses[-1]["step"], "initial_loss": losses[0]["train/loss"],
            "train_seconds": round(elapsed[-1], 1) if elapsed else None,
            "final_loss": losses[-1]["train/loss"], "checkpoint": str(ckpt / tag),
            "world_size": read_meta(ckpt / tag)["world_size"], "zero_stage": resolved["deepspeed"]["zero_stage"]}


def evaluate(task: str, run_dir: str, data: Path, untrained: bool = False, sets: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "blip_train.eval", "--task", task, "--checkpoint", run_dir,
           "--data", str(data / "val")] + [a for s in sets for a in ("--set", s)]
    if untrained:
        cmd.append("--untrained")
    return last_json_line(run(cmd))


def evaluate_primary(task: str, run_dir: str, data: Path, key: str, label: str) -> dict:
    """The held-out metrics of a trained stage and of the same model untrained, with the headline `primary`."""
    trained = evaluate(task, run_dir, data)
    untrained = evaluate(task, run_dir, data, untrained=True)
    return {task: trained, f"{task}_untrained": untrained,
            "primary": {"name": label, "trained": trained[key], "untrained": untrained[key],
                        "chance": trained[f"chance_{key}"]}}


RETRIEVAL = {  # demo stage → (recipe, what trains)
    "stage1": ("demo/stage1", "BLIP-2 stage 1: Q-Former representation learning (ITC + ITM + ITG) against a frozen ViT"),
    "blip": ("demo/blip", "BLIP: ViT + MED end to end, momentum encoders + queue (ITC + ITM + LM)"),
    "albef": ("demo/albef", "ALBEF: ViT + text/fusion BERT end to end, momentum encoders + queue (ITC + ITM + MLM)"),
}


def retrieval_stage(name: str, out: Path, data: Path, path_sets: list[str]) -> dict:
    res = train_stage(RETRIEVAL[name][0], out, name, path_sets)
    res["metrics"] = evaluate_primary("retrieval", res["run_dir"], data, "img_r1", "text->image R@1 (%)")
    if name == "blip":  # its image-grounded decoder captions too
        caption = evaluate_primary("caption", res["run_dir"], data, "cider", "caption CIDEr-D")
        res["metrics"].update(caption=caption["caption"], caption_untrained=caption["caption_untrained"],
                              secondary=caption["primary"])
    return res


GENERATIVE = {  # demo stage → (recipe, held-out task, metric key, primary metric name)
    "stage2_opt": ("demo/stage2_opt", "caption", "cider", "caption CIDEr-D"),
    "stage2_t5": ("demo/stage2_t5", "caption", "cider", "caption CIDEr-D"),
    "instruct_llama": ("demo/instruct_llama", "vqa", "vqa_accuracy", "VQA accuracy (%)"),
    "instruct_t5": ("demo/instruct_t5", "vqa", "vqa_accuracy", "VQA accuracy (%)"),
}


def generative_stage(name: str, out: Path, data: Path, path_sets: list[str], assets: Path) -> dict:
    recipe, task, key, label = GENERATIVE[name]
    # The Q-Former starts from this run's own stage 1 (recipes name runs/demo/stage1).
    sets = path_sets + [f"model.init_from={out / 'stage1'}"]
    if path_sets:
        sets.append(f"model.llm.path={assets / recipe.split('_', 1)[1]}")
    res = train_stage(recipe, out, name, sets)
    res["metrics"] = evaluate_primary(task, res["run_dir"], data, key, label)
    return res


FINETUNE = {  # demo stage → (recipe, stage it starts from, held-out task, metric key, primary metric name)
    "finetune_caption": ("demo/finetune_caption", "stage2_opt", "caption", "cider", "caption CIDEr-D (striped split)"),
    "finetune_retrieval": ("demo/finetune_retrieval", "stage1", "retrieval", "img_r1",
                           "text->image R@1 (%) (striped split)"),
}


def finetune_stage(name: str, out: Path, data_ft: Path, path_sets: list[str], assets: Path) -> dict:
    """A fine-tuning stage (ViT trains, layer decay) from the run's own earlier stage, on the fine-tuning split.
    Untrained = its starting checkpoint: eval --untrained rebuilds the step-0 model (ViT from
    model.vision.weights, the rest from model.init_from), i.e. the earlier stage's model."""
    recipe, start, task, key, label = FINETUNE[name]
    sets = [s for s in path_sets if not s.startswith("data.")] + [f"model.init_from={out / start}"]
    if path_sets:
        sets += [f"data.train=[{{local: {data_ft / 'train'}, name: synthetic_patterns}}]",
                 f"data.val={data_ft / 'val'}"]
        if task == "caption":
            sets.append(f"model.llm.path={assets / 'opt'}")
    res = train_stage(recipe, out, name, sets)
    res["metrics"] = evaluate_primary(task, res["run_dir"], data_ft, key, label)
    if task == "caption":  # the attribute itself: does a caption mention stripes exactly when the image has them?
        res["metrics"]["stripes_named"] = {
            which: stripes_named(REPO / res["metrics"][k]["predictions_file"])
            for which, k in (("trained", task), ("untrained", f"{task}_untrained"))}
    return res


VQA_FINETUNE = {  # demo stage → (recipe, stage it starts from)
    "blip_vqa": ("demo/blip_vqa", "blip"),
}


def vqa_finetune_stage(name: str, out: Path, data: Path, path_sets: list[str], assets: Path) -> dict:
    """BLIP's VQA fine-tuning from the run's own BLIP pretraining stage. Answers are ranked over the training
    answers (assets/answer_list.json, the primary metric) and, as a second reading, generated. Untrained = the
    starting checkpoint (the pretrained MED copied into the answer decoder, which has never answered)."""
    recipe, start = VQA_FINETUNE[name]
    sets = path_sets + [f"model.init_from={out / start}"]
    if path_sets:
        sets.append(f"eval.answer_list={assets / 'answer_list.json'}")
    res = train_stage(recipe, out, name, sets)
    # Generated first: the ranked evaluation's predictions file (the same name) is the one kept.
    generated = evaluate("vqa", res["run_dir"], data, sets=("eval.answer_list=",))
    res["metrics"] = evaluate_primary("vqa", res["run_dir"], data, "vqa_accuracy", "VQA accuracy (%), ranked")
    res["metrics"]["secondary"] = {"name": "VQA accuracy (%), generated", "trained": generated["vqa_accuracy"],
                                   "untrained": res["metrics"]["primary"]["untrained"],
                                   "chance": generated["chance_vqa_accuracy"]}
    return res


def stripes_named(predictions_file: Path) -> dict:
    """Share (%) of held-out images whose generated caption says "striped" exactly when the references do
    (every reference names a striped shape's stripes), and the share of images that have stripes."""
    rows = json.loads(Path(predictions_file).read_text())["predictions"]
    has = [any("striped" in r for r in row["references"]) for row in rows]
    said = ["striped" in row["prediction"] for row in rows]
    return {"agreement": 100.0 * sum(h == s for h, s in zip(has, said)) / len(rows),
            "striped_images": 100.0 * sum(has) / len(rows), "captions_saying_striped": 100.0 * sum(said) / len(rows)}


def export_and_check(name: str, run_dir: str, out: Path, data: Path) -> dict:
    """tools/export_hf.py on a demo stage, then transformers loads it (strictly) and generates from it."""
    import io

    import torch
    from PIL import Image
    from streaming import StreamingDataset
    from transformers import AutoProcessor

    from blip_train.data.templates import eval_instruction
    from blip_train.interop.hf_config import hf_class

    folder = out / "export" / name
    if not (folder / "config.json").is_file():
        run([sys.executable, "tools/export_hf.py", "--checkpoint", run_dir, "--out", str(folder), "--overwrite"])
    arch = "instruct" if name.startswith("instruct") else "stage2"
    model, info = hf_class(arch).from_pretrained(str(folder), output_loading_info=True)
    processor = AutoProcessor.from_pretrained(str(folder))
    image = Image.open(io.BytesIO(StreamingDataset(local=str(data / "val"), shuffle=False,
                                                   batch_size=1)[0]["image"])).convert("RGB")
    # InstructBLIP is asked in the instruction format it was tuned with (the VQA evaluation template).
    text = eval_instruction("vqa", "what color is the shape?") if arch == "instruct" else ""
    with torch.no_grad():  # plain generate: the export's saved defaults (beams, stop tokens) apply
        ids = model.eval().generate(**processor(images=[image], text=[text], return_tensors="pt"), max_new_tokens=12)
    return {"dir": str(folder), "class": type(model).__name__, "prompt": text,
            "missing_keys": len(info["missing_keys"]), "unexpected_keys": len(info["unexpected_keys"]),
            "generated": processor.batch_decode(ids, skip_special_tokens=True)[0].strip()}


def run_stages(out: Path, data: Path, path_sets: list[str], assets: Path, entries: dict,
               checkpoint: Callable[[], None] = lambda: None) -> dict:
    """Every stage into `out/<stage>` (the retrieval-trained ones: stage 1, BLIP, ALBEF; then the generative stages
    from stage 1, then the fine-tuning stages from stage 1 and stage2_opt on `data`'s sibling data_ft); `entries` gets each
    stage's summary record as it finishes, and `checkpoint()` is called after each."""
    from blip_train.config import load_config

    for name in RETRIEVAL:
        log(f"{name}: {RETRIEVAL[name][1]}, 2 ranks, ZeRO-{load_config(RETRIEVAL[name][0]).deepspeed.zero_stage}")
        entries[name] = stage_entry(retrieval_stage(name, out, data, path_sets))
        checkpoint()
    for name in VQA_FINETUNE:
        log(f"{name}: {VQA_FINETUNE[name][0]}, 2 ranks, ZeRO-2, from {VQA_FINETUNE[name][1]}: question encoder + "
            "answer decoder")
        entries[name] = stage_entry(vqa_finetune_stage(name, out, data, path_sets, assets))
        checkpoint()
    for name in GENERATIVE:
        log(f"{name}: {GENERATIVE[name][0]}, 2 ranks, ZeRO-3, Q-Former from stage 1, frozen LLM")
        entries[name] = stage_entry(generative_stage(name, out, data, path_sets, assets))
        checkpoint()
    for name in FINETUNE:
        log(f"{name}: {FINETUNE[name][0]}, 2 ranks, ZeRO-3, from {FINETUNE[name][1]}, ViT trains (layer decay), "
            "on the striped split")
        entries[name] = stage_entry(finetune_stage(name, out, data.parent / "data_ft", path_sets, assets))
        checkpoint()
    return entries


def seed_spread(out: Path, data: Path, path_sets: list[str], main: dict, seeds: list[int]) -> dict:
    """Each stage again with every other run.seed (under out/seeds/seed_<s>/), and the spread of its primary
    metric over these seeds and the main run's (the recipes' seed): learning must not be luck."""
    import yaml

    recipe_seed = yaml.safe_load((REPO / "blip_train/recipes/demo/stage1.yaml").read_text())["run"]["seed"]
    runs = {recipe_seed: main}
    for seed in seeds:
        if seed not in runs:
            log(f"seed {seed}: every stage again with run.seed={seed}")
            runs[seed] = run_stages(out / "seeds" / f"seed_{seed}", data, path_sets + [f"run.seed={seed}"],
                                    out / "assets", {})
    stages = {}
    for name in main:
        prims = [runs[s][name]["metrics"]["primary"] for s in sorted(runs)]
        stages[name] = {"trained": [p["trained"] for p in prims], "untrained": [p["untrained"] for p in prims],
                        "trained_min": min(p["trained"] for p in prims), "trained_max": max(p["trained"] for p in prims),
                        "untrained_max": max(p["untrained"] for p in prims), "chance": prims[0]["chance"]}
        log(f"{name:<15} over seeds {sorted(runs)}: trained {stages[name]['trained']} vs untrained "
            f"{stages[name]['untrained']} vs chance {stages[name]['chance']:.1f}")
    return {"seeds": sorted(runs), "stages": stages}


def stage_entry(res: dict) -> dict:
    """The per-stage record of summary.json (DESIGN.md §3)."""
    return {k: res[k] for k in ("world_size", "zero_stage", "steps", "initial_loss", "final_loss", "checkpoint",
                                "metrics", "run_dir", "train_seconds")}


def write_summary(out: Path, summary: dict, t0: float) -> None:
    """Written after every stage, so an interrupted demo still shows what it finished."""
    summary["wall_seconds"] = round(time.time() - t0, 1)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blip_train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--num-samples", type=int, default=2200)
    p.add_argument("--prepare", action="store_true",
                   help="only build the data (both splits) and the pretrained tiny towers the demo recipes read, then stop")
    p.add_argument("--seeds", default="",
                   help="also train and evaluate every stage with these run.seed values (comma-separated; under "
                        "OUT/seeds/) and report the spread of each stage's primary metric")
    p.add_argument("--no-readme", action="store_true",
                   help="do not rewrite README.md's results block (it is rewritten after a run into runs/demo)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_data(out, args.num_samples)
    make_finetune_data(out)
    info = make_assets(out, data, image_size=64)
    if args.prepare:
        log(f"prepared {data} and {out / 'assets'} in {time.time() - t0:.0f}s; e.g. "
            "python -m blip_train.train --config demo/stage1 --set train.max_steps=100")
        return 0
    # Recipes name runs/demo/...; a different --out is passed through as overrides.
    path_sets = [] if out.resolve() == (REPO / "runs/demo").resolve() else [
        f"data.train=[{{local: {data / 'train'}, name: synthetic}}]", f"data.val={data / 'val'}",
        f"model.vision.weights={out / 'assets/vit.safetensors'}",
        f"model.qformer.tokenizer={out / 'assets/qformer_tokenizer'}", f"model.text.tokenizer={out / 'assets/qformer_tokenizer'}"]
    summary: dict = {"stages": {}, "assets": info}
    run_stages(out, data, path_sets, out / "assets", summary["stages"], lambda: write_summary(out, summary, t0))
    summary["export"] = {name: export_and_check(name, summary["stages"][name]["run_dir"], out, data)
                         for name in GENERATIVE}
    write_summary(out, summary, t0)
    if args.seeds:
        summary["seeds"] = {"primary": seed_spread(out, data, path_sets, summary["stages"],
                                                   [int(x) for x in args.seeds.split(",")])}
        write_summary(out, summary, t0)
    for name, st in summary["stages"].items():
        prim = st["metrics"]["primary"]
        log(f"{name:<15} loss {st['initial_loss']:.3f} → {st['final_loss']:.3f}; {prim['name']}: trained "
            f"{prim['trained']:.1f} vs untrained {prim['untrained']:.1f} vs chance {prim['chance']:.1f}")
    for name, ex in summary["export"].items():
        log(f"export {name}: {ex['class']} loads with {ex['missing_keys']} missing / {ex['unexpected_keys']} "
            f"unexpected keys; generates {ex['generated']!r}")
    log(f"wrote {out / 'summary.json'} in {summary['wall_seconds']:.0f}s")
    if not args.no_readme and out.resolve() == (REPO / "runs/demo").resolve():
        from blip_train.demo.readme import update_readme
        if update_readme(REPO / "README.md", summary):
            log("README.md: results block rewritten from this run's summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
