"""The demo's stages: each trains a demo recipe on 2 ranks (`torchrun -m blip_train.train`), then evaluates it
held-out, trained and untrained (`python -m blip_train.eval`); `run_stages` runs them in order."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from blip_train.demo.process import REPO, last_json_line, log, run
from blip_train.distributed.env import free_port

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


MODALITIES = {  # demo stage → (recipe, data folder under the demo's, held-out task, metric key, primary metric name,
    #             the frozen encoder's key, its folder under assets/)
    "audio_caption": ("demo/audio_caption", "data_audio", "caption", "cider", "caption CIDEr-D (tones)",
                      "model.audio.encoder", "ast"),
    "3d_qa": ("demo/3d_qa", "data_points", "vqa", "vqa_accuracy", "VQA accuracy (%) (solids)", "model.points.encoder",
              "point_bert"),
}


def modality_stage(name: str, out: Path, path_sets: list[str], assets: Path) -> dict:
    """A stage on another modality's data (its own split and frozen encoder; nothing from the image stages)."""
    recipe, folder, task, key, label, encoder_key, encoder = MODALITIES[name]
    data = out / folder
    sets = [f"data.train=[{{local: {data / 'train'}, name: {folder}}}]", f"data.val={data / 'val'}",
            f"{encoder_key}={assets / encoder}", f"model.qformer.tokenizer={assets / 'qformer_tokenizer'}",
            f"model.llm.path={assets / 'opt'}"] if path_sets else []
    res = train_stage(recipe, out, name, sets)
    res["metrics"] = evaluate_primary(task, res["run_dir"], data, key, label)
    files = {which: REPO / res["metrics"][k]["predictions_file"]
             for which, k in (("trained", task), ("untrained", f"{task}_untrained"))}
    if task == "caption":
        res["metrics"]["secondary"] = {"name": "exact caption (%): every property named right",
                                       **{w: exact_captions(f) for w, f in files.items()},
                                       "chance": majority_caption_share(files["trained"])}
    else:  # the question a single answer prior cannot carry: which of four solids
        question = "what shape is this?"
        res["metrics"]["secondary"] = {"name": f"accuracy (%) on {question!r}",
                                       **{w: question_accuracy(f, question)[0] for w, f in files.items()},
                                       "chance": question_accuracy(files["trained"], question)[1]}
    return res


def question_accuracy(predictions_file: Path, question: str) -> tuple[float, float]:
    """Share (%) of the held-out rows asking `question` answered right (the first reference answer), and the
    share that the most frequent answer to it would get."""
    from collections import Counter

    from blip_train.data.collate import pre_caption

    rows = [r for r in json.loads(Path(predictions_file).read_text())["predictions"] if r["question"] == question]
    right = sum(pre_caption(r["prediction"]) == pre_caption(r["answers"][0]) for r in rows)
    majority = Counter(r["answers"][0] for r in rows).most_common(1)[0][1]
    return 100.0 * right / len(rows), 100.0 * majority / len(rows)


def exact_captions(predictions_file: Path) -> float:
    """Share (%) of held-out clips whose generated caption is one of its references, word for word."""
    from blip_train.data.collate import pre_caption

    rows = json.loads(Path(predictions_file).read_text())["predictions"]
    return 100.0 * sum(pre_caption(r["prediction"]) in {pre_caption(c) for c in r["references"]}
                       for r in rows) / len(rows)


def majority_caption_share(predictions_file: Path) -> float:
    """Share (%) of held-out clips that the most frequent reference caption describes: what a captioner that ignores
    the sound and always writes that caption would get right."""
    from collections import Counter

    rows = json.loads(Path(predictions_file).read_text())["predictions"]
    return 100.0 * Counter(r["references"][0] for r in rows).most_common(1)[0][1] / len(rows)


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
    for name in MODALITIES:
        log(f"{name}: {MODALITIES[name][0]}, 2 ranks, ZeRO-3, frozen encoder assets/{MODALITIES[name][6]}, "
            "Q-Former from scratch, LoRA on the frozen LLM")
        entries[name] = stage_entry(modality_stage(name, out, path_sets, assets))
        checkpoint()
    return entries


def stage_entry(res: dict) -> dict:
    """The per-stage record of summary.json (DESIGN.md §3)."""
    return {k: res[k] for k in ("world_size", "zero_stage", "steps", "initial_loss", "final_loss", "checkpoint",
                                "metrics", "run_dir", "train_seconds")}
