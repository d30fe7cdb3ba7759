"""`make demo`: the whole system end to end on this CPU machine, with results in runs/demo/summary.json.

    python -m blip_train.demo --out runs/demo
    python -m blip_train.demo --prepare      # only steps 1-2: what the demo recipes (demo/*) read

1. synthetic shapes dataset → runs/demo/data/{train,val} (MDS shards, tools/make_synthetic_dataset.py), and
   the fine-tuning split → runs/demo/data_ft/{train,val}: its own scenes, shapes plain or "striped"
2. assets: Q-Former tokenizer trained on the train captions; tiny ViT pretrained on the train split; the
   training answers as BLIP's VQA candidates (tools/answer_list.py); the audio stage's tones
   (runs/demo/data_audio) and its frozen encoder (a tiny ASTModel folder)
3. each stage on 2 ranks, DeepSpeed ZeRO-3 bf16 over gloo (`torchrun -m blip_train.train`; BLIP, ALBEF and
   BLIP's VQA fine-tuning from the BLIP stage under ZeRO-2); last, two fine-tuning stages (trainable ViT with
   layer decay) on data_ft, from stage2_opt (captioning) and stage1 (retrieval); then audio captioning on the
   tones (model.modality: audio)
4. held-out evaluation of every stage, trained vs untrained (`python -m blip_train.eval`), plus chance
5. summary.json as DESIGN.md §3 specifies
Steps whose outputs exist are reused, so a re-run after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from blip_train.demo.process import REPO, log, run
from blip_train.demo.stages import GENERATIVE, run_stages

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


def make_audio_data(out: Path, num_samples: int = 1200) -> Path:
    """The audio stage's split (2-s tones whose pitch, pattern and loudness the captions name) and its frozen
    encoder: a tiny ASTModel folder, random, as an AudioSet-trained AST would come (no audio model can be
    downloaded here; a random frozen encoder still maps each filterbank patch to its own features)."""
    data = out / "data_audio"
    if not ((data / "train").is_dir() and (data / "val").is_dir()):
        run([sys.executable, "tools/make_synthetic_dataset.py", "--audio", "--out", str(data), "--num-samples",
             str(num_samples), "--seed", "0", "--val-fraction", "0.1", "--overwrite"])
    else:
        log(f"audio data: reusing {data}")
    ast = out / "assets" / "ast"
    if not (ast / "config.json").is_file():
        import torch
        from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

        torch.manual_seed(0)
        cfg = ASTConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                        patch_size=16, frequency_stride=16, time_stride=16, max_length=100, num_mel_bins=128)
        ASTModel(cfg).save_pretrained(ast)
        ASTFeatureExtractor(num_mel_bins=128, max_length=100).save_pretrained(ast)
        log(f"assets: tiny random ASTModel (frozen audio encoder, 1-s segments of 128 mel bins) → {ast}")
    return data


def make_points_data(out: Path, num_clouds: int = 1200) -> Path:
    """The 3D stage's split (coloured solids, three questions each) and its frozen encoder: a tiny Point-BERT
    folder, pretrained on the train clouds to tag their captions' words (demo/pretrain.py), as ULIP-2's would
    come pretrained. A random one was tried first: its tokens still separate the kinds under a linear probe, but
    the Q-Former trained on them learned only each question's answer prior (38.1% VQA accuracy, 19.2% chance)."""
    data = out / "data_points"
    if not ((data / "train").is_dir() and (data / "val").is_dir()):
        run([sys.executable, "tools/make_synthetic_dataset.py", "--points", "--out", str(data), "--num-samples",
             str(num_clouds), "--num-points", "512", "--seed", "0", "--val-fraction", "0.1", "--overwrite"])
    else:
        log(f"3D data: reusing {data}")
    folder = out / "assets" / "point_bert"
    if not (folder / "config.json").is_file():
        from blip_train.demo.pretrain import pretrain_point_bert
        from blip_train.models.point_encoder import PointBertShape

        shape = PointBertShape(trans_dim=96, depth=4, num_heads=4, group_size=16, num_group=32, encoder_dims=96,
                               in_channels=6)
        info = pretrain_point_bert(shape, str(data / "train"), folder, steps=150, batch_size=32, log=log)
        log(f"assets: tiny Point-BERT (frozen 3D encoder, xyz + rgb, 32 patches of 16 points), tag-loss "
            f"{info['initial_loss']:.3f} → {info['final_loss']:.3f} → {folder}")
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
    # Absolute: the steps below run their tools from the repository, so a relative --out would name one
    # folder here and another there.
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_data(out, args.num_samples)
    make_finetune_data(out)
    info = make_assets(out, data, image_size=64)
    make_audio_data(out)
    make_points_data(out)
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
