"""WorldInfo gathers and dist helpers: one process, and 2 ranks under torchrun (gloo)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_train.distributed.world import build_world_info
from tests.conftest import torchrun
from tests.distributed._world_script import rank_input, rank_loss

SCRIPT = Path(__file__).with_name("_world_script.py")


def test_world_info_without_process_group_is_one_rank() -> None:
    info = build_world_info()
    x = torch.ones(2, 3, requires_grad=True)
    assert (info.rank, info.size) == (0, 1)
    assert not info.gather(x).requires_grad
    assert info.gather_with_grad(x) is x


@pytest.mark.dist
def test_two_rank_gathers_match_single_process(tmp_path: Path) -> None:
    proc = torchrun([str(SCRIPT), str(tmp_path)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["size"], r["launcher"], r["local_world_size"]) for r in ranks] == \
        [(0, 2, "torchrun", 2), (1, 2, "torchrun", 2)]

    full = torch.cat([rank_input(0), rank_input(1)])  # (2B, D)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["gather"], dtype=torch.float64), full, rtol=0, atol=0)
        torch.testing.assert_close(torch.tensor(r["gather_with_grad"], dtype=torch.float64), full, rtol=0, atol=0)
        assert r["gather_requires_grad"] is False

    # Single process: the sum of both ranks' losses on the concatenated batch. Each rank's slice of
    # that gradient must equal what gather_with_grad delivered to the rank owning the slice.
    ref = full.clone().requires_grad_(True)
    (rank_loss(ref, 0) + rank_loss(ref, 1)).backward()
    got = torch.cat([torch.tensor(r["grad"], dtype=torch.float64) for r in ranks])
    torch.testing.assert_close(got, ref.grad, rtol=1e-12, atol=1e-10)

    for r in ranks:
        assert r["mean"] == [0.5, 10.0]
        assert (r["any_rank1"], r["any_none"]) == (True, False)
        # ZeRO-3: a partitioned Linear(4, 3) holds nothing locally, 12 elements in full.
        assert (r["zero3_param"], r["local_numel"], r["full_numel"]) == (True, 0, 12)
        assert r["gathered_shape"] == [3, 4]
        assert r["after_modify"] == [1.5]
        assert r["plain"] == [False, 12]
