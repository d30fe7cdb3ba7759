"""2-rank momentum ITC: per-rank losses follow the definition, queues stay identical across ranks
and equal a 1-rank queue fed the whole global batch, ITM sims span the global batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_train.models.blip_losses import global_sims
from blip_train.models.world import WorldInfo
from tests.conftest import torchrun
from tests.distributed._blip_losses_script import ALPHA, GLOBAL_B, STEPS, TEMP, global_batch, new_queue
from tests.unit.test_blip_losses import ref_momentum_itc

SCRIPT = Path(__file__).with_name("_blip_losses_script.py")


@pytest.mark.dist
def test_momentum_itc_and_queue_two_ranks(tmp_path: Path) -> None:
    proc = torchrun([str(SCRIPT), str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["size"] for r in ranks] == [2, 2]
    b = GLOBAL_B // 2
    ref_queue = new_queue()  # one rank, fed each whole global batch
    for step in range(STEPS):
        x = global_batch(step)
        for r in ranks:
            half = {k: v[r["rank"] * b:(r["rank"] + 1) * b] for k, v in x.items()}
            got = r["steps"][step]
            # (a) each rank's loss is the float64 definition on its half, against the shared queue
            for key, idx in (("loss_plain", None), ("loss_ids", half["ids"])):
                ref = ref_momentum_itc(half["img"], half["txt"], half["img_m"], half["txt_m"],
                                       ref_queue.image_queue, ref_queue.text_queue, TEMP, ALPHA,
                                       idx=idx, idx_q=ref_queue.idx_queue)
                assert got[key] == pytest.approx(ref["loss"], rel=1e-10), (step, r["rank"], key)
            # (c) ITM sims: local rows against the whole global batch, as the 1-rank rows
            full_i2t, full_t2i = global_sims(x["img"], x["txt"], TEMP, WorldInfo())  # (G, G)
            rows = slice(r["rank"] * b, (r["rank"] + 1) * b)
            for key, full in (("sim_i2t", full_i2t), ("sim_t2i", full_t2i)):
                sim = torch.tensor(got[key], dtype=torch.float64)
                assert sim.shape == (b, GLOBAL_B)
                torch.testing.assert_close(sim, full[rows], rtol=1e-12, atol=1e-12)
            for key in ("neg_image", "neg_text"):  # negatives are global indices, never a positive
                for i, j in enumerate(got[key]):
                    own = r["rank"] * b + i
                    assert 0 <= j < GLOBAL_B and j != own and int(x["ids"][j]) != int(x["ids"][own])
        # (b) after the enqueue both ranks hold the 1-rank queue, bit for bit
        ref_queue.enqueue_(x["img_m"], x["txt_m"], x["ids"])
        expected = {k: v.tolist() for k, v in ref_queue.state_dict().items()}
        assert ranks[0]["steps"][step]["queue"] == ranks[1]["steps"][step]["queue"] == expected, step
    assert ref_queue.ptr.tolist() == [STEPS * GLOBAL_B % ref_queue.queue_size]
