"""Where evaluation runs and how it shares work: device choice, batch dealing, lockstep padding, gathers.

No GPU here: the device decision is tested as a function (and through `blip_train.eval.main` with
CUDA reported available), the collectives with a stand-in for torch.distributed that records the
device of every tensor it is handed.
"""
from __future__ import annotations

import json

import pytest
import torch

from blip_train.config import ConfigError, ExperimentConfig
from blip_train.data.schema import write_split
from blip_train.data.synthetic import make_sample
from blip_train.evaluation import distributed
from blip_train.evaluation.distributed import all_gather_rows, in_rank_order, pick_eval_device, plan_batches


@pytest.mark.parametrize("run_device,local_rank,cuda_devices,want", [
    ("auto", 3, 8, "cuda:3"),
    ("cuda", 1, 8, "cuda:1"),
    ("auto", 0, 0, "cpu"),
    ("cpu", 3, 8, "cpu"),        # run.device=cpu on a GPU node stays on the CPU (and gloo)
    ("auto", 5, 1, "cuda:0"),    # --gpus-per-task=1: each task sees one GPU, as init_distributed binds it
])
def test_eval_device_follows_run_device_and_local_rank(run_device, local_rank, cuda_devices, want):
    assert pick_eval_device(run_device, local_rank, cuda_devices) == torch.device(want)


def test_cuda_requested_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="run.device"):
        pick_eval_device("cuda", 0, 0)


def test_batches_are_dealt_whole_and_round_robin():
    plan = {r: plan_batches(10, 3, r, 2) for r in range(2)}
    assert [list(b) for b, _ in plan[0]] == [[0, 1, 2], [6, 7, 8]]
    assert [list(b) for b, _ in plan[1]] == [[3, 4, 5], [9]]
    assert all(keep for r in plan for _, keep in plan[r])
    # the same batches as on one rank, whatever the world size
    one = [list(b) for b, _ in plan_batches(10, 3, 0, 1)]
    assert sorted(list(b) for r in plan for b, _ in plan[r]) == sorted(one)


def test_lockstep_gives_every_rank_the_same_number_of_batches():
    # 5 batches on 3 ranks: rank 2 has one, repeats it and discards the repeat
    plans = [plan_batches(10, 2, r, 3, lockstep=True) for r in range(3)]
    assert [len(p) for p in plans] == [2, 2, 2]
    assert [(list(b), keep) for b, keep in plans[2]] == [([4, 5], True), ([4, 5], False)]
    # a rank with no batch of its own still makes the calls (with batch 0), all discarded
    plans = [plan_batches(3, 4, r, 2, lockstep=True) for r in range(2)]
    assert [(list(b), keep) for b, keep in plans[1]] == [([0, 1, 2], False)]
    # kept batches are exactly the un-padded plan
    assert [b for b, keep in plan_batches(10, 2, 2, 3, lockstep=True) if keep] == \
        [b for b, _ in plan_batches(10, 2, 2, 3)]


class FakeGroup:
    """Two ranks seen from rank 0: `all_gather` records the device of what it is handed."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other, self.devices = other, []

    def all_gather(self, out: list, tensor: torch.Tensor) -> None:
        self.devices.append(tensor.device)
        if tensor.dtype == torch.int64 and tensor.shape == (1,):   # the row counts
            out[0], out[1] = torch.tensor([self.local_rows]), torch.tensor([self.other.shape[0]])
        else:  # padded rows; the meta device holds no data, so rank 0's rows come from the test
            rows = max(self.local_rows, self.other.shape[0])
            pad = lambda t: torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])  # noqa: E731
            out[0], out[1] = pad(self.local), pad(self.other)


def test_gathered_tensors_are_sent_on_the_collective_device(monkeypatch):
    local, other = torch.arange(4.0).view(2, 2), torch.arange(10.0, 16.0).view(3, 2)
    group = FakeGroup(other)
    group.local, group.local_rows = local, 2
    # an NCCL group would say cuda:LOCAL_RANK; "meta" stands in for a device the CPU tensors are not on
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(distributed.dist, "all_gather", group.all_gather)
    parts = all_gather_rows(local, world=2)
    assert group.devices == [torch.device("meta")] * 2
    assert torch.equal(parts[0], local) and torch.equal(parts[1], other)
    assert all(p.device == local.device for p in parts)


def test_rows_from_ranks_go_back_in_split_order():
    # 5 items, batches of 2 on 2 ranks: rank 0 holds 0,1,4 and rank 1 holds 2,3
    plans = [[j for b, _ in plan_batches(5, 2, r, 2) for j in b] for r in range(2)]
    parts = [torch.tensor([0.0, 1.0, 4.0]), torch.tensor([2.0, 3.0])]
    assert in_rank_order(parts, plans, 5).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(RuntimeError, match="exactly once"):
        in_rank_order(parts, [[0, 1, 4], [2, 2]], 5)


def test_standalone_eval_puts_the_model_on_cuda_local_rank(monkeypatch, tmp_path, capsys):
    """`python -m blip_train.eval` on a (pretend) GPU node: frozen dtypes for CUDA, model on cuda:0."""
    import blip_train.eval as entry
    from blip_train.evaluation import stage1_eval
    from blip_train.training import stages

    cfg = ExperimentConfig()
    cfg.model.arch = "stage1"
    run = tmp_path / "run"
    monkeypatch.setattr(entry, "load_run_config", lambda checkpoint, overrides: (cfg, run / "checkpoints", "step_1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    seen = {}

    class Model:
        def to(self, device):
            seen["to"] = torch.device(device)
            return self

    def load(cfg, ckpt_dir, tag, untrained=False, device_type=None):
        seen["device_type"] = device_type
        return Model(), None

    def evaluate(model, tokenizer, split, *args, max_samples=0, **kwargs):
        seen["max_samples"] = max_samples
        return {"r_mean": 1.0}, {}

    monkeypatch.setattr(stages, "load_trained_retrieval_model", load)
    monkeypatch.setattr(stage1_eval, "evaluate_retrieval", evaluate)
    split = tmp_path / "split"
    write_split(split, [make_sample(i, seed=0, image_size=16) for i in range(2)])
    assert entry.main(["--task", "retrieval", "--checkpoint", str(run), "--data", str(split)]) == 0
    assert seen == {"device_type": "cuda", "to": torch.device("cuda:0"), "max_samples": 0}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["device"] == "cuda:0"
    cfg.run.device = "cpu"  # as training: run.device=cpu keeps a GPU node's run on the CPU
    assert entry.main(["--task", "retrieval", "--checkpoint", str(run), "--data", str(split)]) == 0
    assert seen["device_type"] == "cpu" and seen["to"] == torch.device("cpu")
