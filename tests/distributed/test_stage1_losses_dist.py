"""2-rank ITC: the rank-averaged loss and gradients equal the 1-rank computation on the whole batch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from blip_train.models.stage1 import Blip2Stage1
from blip_train.models.stage1_losses import itc_loss
from blip_train.models.world import WorldInfo
from tests.conftest import torchrun
from tests.distributed._stage1_losses_script import GLOBAL_B, IDS, global_batch
from tests.unit.test_stage1_model import make_batch, tiny_model_config

SCRIPT = Path(__file__).with_name("_stage1_losses_script.py")


@pytest.mark.dist
def test_itc_two_ranks_equals_one_rank(tmp_path: Path) -> None:
    proc = torchrun([str(SCRIPT), str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["size"] for r in ranks] == [2, 2]
    img_all, txt_all, ids_all = global_batch()
    b = GLOBAL_B // 2

    for name, ids in (("plain", None), ("ids", ids_all)):
        img = img_all.clone().requires_grad_(True)
        txt = txt_all.clone().requires_grad_(True)
        temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
        ref = itc_loss(img, txt, temp, WorldInfo(), image_ids=ids)
        ref.loss.backward()
        # The trainer averages losses and gradients over ranks (data parallel): loss = mean_r L_r.
        assert sum(r[name]["loss"] for r in ranks) / 2 == pytest.approx(ref.loss.item(), rel=1e-12)
        # d(mean_r L_r)/d(feats of rank r) = grad_r / 2: only the local operand carries gradient, so
        # nothing flows to other ranks' features and no cross-rank gradient exchange is needed.
        img_grad = torch.cat([torch.tensor(r[name]["img_grad"], dtype=torch.float64) for r in ranks]) / 2
        txt_grad = torch.cat([torch.tensor(r[name]["txt_grad"], dtype=torch.float64) for r in ranks]) / 2
        torch.testing.assert_close(img_grad, img.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(txt_grad, txt.grad, rtol=1e-10, atol=1e-12)
        assert sum(r[name]["temp_grad"] for r in ranks) / 2 == pytest.approx(temp.grad.item(), rel=1e-10)

    for r in ranks:
        for key in ("neg_image_idx", "neg_text_idx"):
            for draw in r[key]:
                for i, j in enumerate(draw):
                    own = r["rank"] * b + i
                    assert 0 <= j < GLOBAL_B and j != own and IDS[j] != IDS[own], (r["rank"], key, i, j)

    # The model on two ranks: ITC (deterministic: dropout 0) averages to the 1-rank value on the
    # whole batch; ITM (random negatives from the other rank too) and ITG run and train ln_vision.
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = Blip2Stage1(cfg).train()
    ref_itc = model(make_batch(cfg, seed=3))["loss_itc"].item()
    assert sum(r["model"]["loss_itc"] for r in ranks) / 2 == pytest.approx(ref_itc, rel=1e-5)
    for r in ranks:
        assert all(math.isfinite(r["model"][k]) for k in ("loss", "loss_itm", "loss_itg"))
        assert r["model"]["ln_vision_grad"] > 0
