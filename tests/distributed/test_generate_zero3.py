"""Generation under ZeRO-3 on 2 ranks (every parameter partitioned) equals the 1-rank model's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_train.data.tokenizers import train_bpe_tokenizer
from tests.conftest import torchrun
from tests.distributed._generate_script import CASES, build_model, generation_inputs, own_length
from tests.unit.test_llm_bridge import save_tiny_llm

SCRIPT = Path(__file__).with_name("_generate_script.py")
TEXTS = ["a red circle on the left", "what color is the square? blue", "two shapes: a green triangle"] * 5


@pytest.mark.dist
def test_generate_two_ranks_zero3_equals_one_rank(tmp_path: Path) -> None:
    llms = tmp_path / "llms"
    toks = {}
    for kind in ("opt", "t5"):
        save_tiny_llm(kind, llms / kind)
        toks[kind] = train_bpe_tokenizer(TEXTS, 300, llms / kind, style=kind)  # decodes the ids below
    proc = torchrun([str(SCRIPT), str(tmp_path), str(llms)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for name, (arch, kind, kwargs) in CASES.items():
        for r in ranks:
            assert r[name]["partitioned"] == r[name]["params"] and r[name]["synced"], (name, r[name])
        # Same batch on both ranks: the same text.
        same = [toks[kind].batch_decode(r[name]["same"], skip_special_tokens=True) for r in ranks]
        assert same[0] == same[1] and any(s.strip() for s in same[0])
        # And the un-partitioned single-process model says the same, for every rank's own batch too.
        model = build_model(arch, llms / kind).eval()
        for seed, want_rank in ((5, 0), (5, 1), (100, 0), (101, 1)):
            key = "same" if seed == 5 else "own"
            b = generation_inputs(arch, model.decoder_only, seed)
            extra = {} if key == "same" else {"max_new_tokens": own_length(want_rank)}
            with torch.no_grad():
                ref = model.generate(b["pixel_values"], b["llm_input_ids"], b["llm_attention_mask"],
                                     b.get("qformer_input_ids"), b.get("qformer_attention_mask"),
                                     **{**kwargs, **extra})
            assert ref.tolist() == ranks[want_rank][name][key], (name, key, want_rank)
