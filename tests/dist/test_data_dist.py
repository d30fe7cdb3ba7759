"""Two ranks read disjoint samples, resume exactly mid-epoch, and a 2-rank state resumes on 1 rank."""
from __future__ import annotations

import json

import pytest

from tests.conftest import torchrun

from blip_train.config.schema import DataConfig, StreamConfig
from blip_train.data.datasets import build_train_loader
from blip_train.data.schema import write_split
from blip_train.data.synthetic import make_sample

pytestmark = pytest.mark.dist
N = 40


def test_two_ranks_disjoint_and_resume(tmp_path):
    split = tmp_path / "train"
    write_split(split, (make_sample(i, seed=0, image_size=16) for i in range(N)))
    r = torchrun(["tests/dist/_data_rank_script.py", "--data", str(split), "--out", str(tmp_path)], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]

    # Disjoint, and together exactly one epoch.
    a, b = (set(x["full"]) for x in ranks)
    assert not a & b and a | b == set(range(N)) and len(ranks[0]["full"]) == len(ranks[1]["full"]) == N // 2
    assert ranks[0]["local_world_size"] == "2"
    # Mid-epoch resume on the same world size gives the uninterrupted order on every rank.
    for x in ranks:
        assert x["part"] + x["rest"] == x["full"]
    assert ranks[0]["state"] == ranks[1]["state"]

    # Elastic 2 → 1: the saved state resumes on one rank with exactly the samples not yet seen.
    loader = build_train_loader(DataConfig(train=[StreamConfig(local=str(split))], image_size=16,
                                           num_workers=0), 4)
    loader.load_state_dict(ranks[0]["state"])
    rest = [i for batch in loader for i in batch["image_id"].tolist()]
    seen = ranks[0]["part"] + ranks[1]["part"]
    assert sorted(seen + rest) == list(range(N))
