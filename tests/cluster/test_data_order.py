"""The data order does not depend on the node layout: with the default `data.num_canonical_nodes`, 1 node x
2 ranks and 2 nodes x 1 rank (srun on the local cluster, each node with its own /dev/shm) read the same samples
in the same global order, epoch after epoch (streaming's default, the number of physical nodes, partitions
and shuffles differently on each layout). Both layouts also show the ranks that real `srun` tasks get from
their SLURM variables, and that they form a working process group on one node and across two."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, clean_env

pytestmark = pytest.mark.cluster
SCRIPT = "tests/cluster/_data_order_script.py"


def _srun(cluster, nodes: int, tasks_per_node: int, split: str, out) -> dict:
    r = cluster.run(["srun", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1",
                     sys.executable, SCRIPT, split, str(out)], env=cluster.env(clean_env()), cwd=REPO, timeout=300,
                    check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_one_node_two_ranks_and_two_nodes_one_rank_read_the_same_global_order(slurm_cluster, tiny_assets, tmp_path):
    split = str(tiny_assets / "data" / "train")
    a = _srun(slurm_cluster, 1, 2, split, tmp_path / "1x2.json")
    b = _srun(slurm_cluster, 2, 1, split, tmp_path / "2x1.json")
    assert [(e["launcher"], e["rank"], e["local_rank"], e["local_world_size"], e["node_rank"]) for e in a["envs"]] \
        == [("slurm", 0, 0, 2, 0), ("slurm", 1, 1, 2, 0)]
    assert [(e["launcher"], e["rank"], e["local_rank"], e["local_world_size"], e["node_rank"]) for e in b["envs"]] \
        == [("slurm", 0, 0, 1, 0), ("slurm", 1, 0, 1, 1)] and {e["master_addr"] for e in b["envs"]} == {"bt-node0"}
    assert a["physical_nodes"] == 1 and b["physical_nodes"] == 2 and b["nodes"] == ["bt-node0", "bt-node1"]
    assert [len(r) for r in a["ranks"]] == [24, 24]  # two epochs of 96 samples, 2 ranks x batch 4
    for epoch in (slice(0, 12), slice(12, 24)):
        assert sorted(i for r in a["ranks"] for batch in r[epoch] for i in batch) == list(range(96))
    assert b["ranks"] == a["ranks"]  # rank r's step s batch: the same global batch at every step
