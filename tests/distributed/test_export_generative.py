"""Stage 2 (OPT) and InstructBLIP (T5) trained for real on 2 ranks with ZeRO-3 bf16, then exported with
tools/export_hf.py from the run directory, as after `make demo`: transformers loads the folders with no
missing or unexpected keys, generates from the saved processor, and matches our model rebuilt from the
same checkpoint (fp32 towers from their sources, trained parts from the consolidated shards)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env
from tests.helpers.tiny_run import run_train, write_tiny_config
from tests.parity.test_export_hf_models import TEXTS, _llm_config, assert_export_matches_ours

pytestmark = pytest.mark.dist


def llm_folder(root, kind: str):
    """A tiny random LLM of `kind` with a trained tokenizer, saved as an HF folder under `root`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from blip_train.data.tokenizers import train_bpe_tokenizer

    folder = root / f"llm_{kind}"
    if not (folder / "config.json").is_file():
        tok = train_bpe_tokenizer(TEXTS, vocab_size=90, out_dir=folder, style=kind)
        torch.manual_seed(0)
        cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
        cls.from_config(_llm_config(kind, tok)).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("arch,kind", [("stage2", "opt"), ("instruct", "t5")])
def test_trained_checkpoint_exports_to_a_working_transformers_model(arch, kind, tiny_assets, tmp_path):
    from blip_train.eval import load_run_config
    from blip_train.models.llm_bridge import init_from_earlier_stage_
    from blip_train.training.stages import build_llm_stage_model
    from blip_train.training.weights import read_init_weights

    llm = {"path": str(llm_folder(tiny_assets, kind)), "dtype": "bf16", "max_txt_len": 12, "max_prompt_len": 16}
    run = tmp_path / f"{arch}_{kind}"
    trained = run_train(write_tiny_config(tiny_assets, run, model={"arch": arch, "llm": llm},
                                          train={"max_steps": 2, "save_interval": 2}))
    # The frozen towers went straight into ZeRO-3 partitions as they were built: the LLM at from_pretrained
    # (HfDeepSpeedConfig alive), the ViT under zero.Init — every frozen parameter.
    built = re.search(r"ZeRO-3: ([\d,]+) parameters were partitioned as they were built", trained.stdout)
    frozen = re.search(r"total +trainable +[\d,]+ +frozen +([\d,]+)", trained.stdout)
    assert built and frozen and built.group(1) == frozen.group(1), trained.stdout[-2000:]
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(run),
                        "--out", str(out)], capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["source"]["step"] == 2 and summary["source"]["zero_stage"] == 3 and summary["left_out"] == []

    cfg, _, _ = load_run_config(str(run), ["model.vision.precision=fp32", "model.llm.dtype=fp32",
                                           "model.init_from="])
    ours, _, _ = build_llm_stage_model(cfg, device_type="cpu")
    report = init_from_earlier_stage_(ours, read_init_weights(run))
    assert report["missing"] == [] and report["unused"] == []
    assert_export_matches_ours(out, ours.eval(), arch)

    # the check `make demo` records in summary.json["export"], on this run
    from blip_train.demo.__main__ import export_and_check
    record = export_and_check(f"{arch}_{kind}", str(run), tmp_path / "demo", tiny_assets / "data")
    expected = "InstructBlipForConditionalGeneration" if arch == "instruct" else "Blip2ForConditionalGeneration"
    assert record["class"] == expected and record["missing_keys"] == 0 and record["unexpected_keys"] == 0
    assert isinstance(record["generated"], str) and (record["prompt"] != "") == (arch == "instruct")
