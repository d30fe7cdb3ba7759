"""The data order does not depend on the node layout: with the default `data.num_canonical_nodes`, 1 node x
2 ranks (torchrun) and 2 nodes x 1 rank (srun on the local cluster, each node with its own /dev/shm) read
the same samples in the same global order, epoch after epoch (streaming's default, the number of physical
nodes, partitions and shuffles differently on each layout)."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, clean_env, torchrun

pytestmark = pytest.mark.cluster
SCRIPT = "tests/cluster/_data_order_script.py"


def test_one_node_two_ranks_and_two_nodes_one_rank_read_the_same_global_order(slurm_cluster, tiny_assets, tmp_path):
    split = str(tiny_assets / "data" / "train")
    one_node, two_nodes = tmp_path / "1x2.json", tmp_path / "2x1.json"
    r = torchrun([SCRIPT, split, str(one_node)], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = slurm_cluster.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", sys.executable, SCRIPT,
                           split, str(two_nodes)], env=slurm_cluster.env(clean_env()), cwd=REPO, timeout=300,
                          check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = json.loads(one_node.read_text()), json.loads(two_nodes.read_text())
    assert a["physical_nodes"] == 1 and b["physical_nodes"] == 2 and b["nodes"] == ["bt-node0", "bt-node1"]
    assert [len(r) for r in a["ranks"]] == [24, 24]  # two epochs of 96 samples, 2 ranks x batch 4
    for epoch in (slice(0, 12), slice(12, 24)):
        assert sorted(i for r in a["ranks"] for batch in r[epoch] for i in batch) == list(range(96))
    assert b["ranks"] == a["ranks"]  # rank r's step s batch: the same global batch at every step
