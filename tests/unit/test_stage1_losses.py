"""Stage-1 losses against direct float64 evaluations of their definitions (DESIGN.md §4).

The references below are written from the definitions with explicit loops, exp and log, and share
no code with `blip_train.models.stage1_losses`.
"""
from __future__ import annotations

import math

import pytest
import torch

from blip_train.models.stage1_losses import (itc_loss, itg_loss, itm_loss, sample_hard_negatives,
                                              soft_cross_entropy)
from blip_train.models.world import WorldInfo

LS = 0.1


def fake_world(rank: int, size: int, others: dict[int, list[torch.Tensor]]) -> WorldInfo:
    """A WorldInfo whose gather places this rank's tensor among fixed tensors of the other ranks.

    `others[r]` lists, in call order, what rank r contributes to each successive gather call.
    """
    calls = {"n": 0}

    def gather(x: torch.Tensor) -> torch.Tensor:
        k = calls["n"]
        calls["n"] += 1
        parts = [x if r == rank else others[r][k] for r in range(size)]
        return torch.cat(parts).detach()

    return WorldInfo(rank=rank, size=size, gather=gather)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def ref_ce(row: list[float], target: list[float]) -> float:
    """-sum_j q_j log softmax(row)_j with q = (1-LS)*target + LS/C."""
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    c = len(row)
    return -sum(((1 - LS) * t + LS / c) * (v - lse) for v, t in zip(row, target))


def ref_itc(img: torch.Tensor, txt: torch.Tensor, all_img: torch.Tensor, all_txt: torch.Tensor,
            temp: float, rank: int, ids=None, all_ids=None) -> float:
    b, nq, e = img.shape
    n = all_txt.shape[0]
    total = 0.0
    for i in range(b):
        if ids is None:
            tgt = [1.0 if j == rank * b + i else 0.0 for j in range(n)]
        else:
            same = [1.0 if int(all_ids[j]) == int(ids[i]) else 0.0 for j in range(n)]
            tgt = [s / sum(same) for s in same]
        i2t = [max(sum(float(img[i, q, k]) * float(all_txt[j, k]) for k in range(e)) for q in range(nq)) / temp
               for j in range(n)]
        t2i = [max(sum(float(txt[i, k]) * float(all_img[j, q, k]) for k in range(e)) for q in range(nq)) / temp
               for j in range(n)]
        total += 0.5 * (ref_ce(i2t, tgt) + ref_ce(t2i, tgt))
    return total / b


def make_feats(b: int, nq: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = unit(torch.randn(b, nq, e, generator=g, dtype=torch.float64))
    txt = unit(torch.randn(b, e, generator=g, dtype=torch.float64))
    return img, txt


@pytest.mark.parametrize("with_ids", [False, True])
def test_itc_matches_definition_one_rank(with_ids: bool) -> None:
    img, txt = make_feats(5, 3, 4, seed=0)
    ids = torch.tensor([7, 3, 7, 1, 3]) if with_ids else None
    temp = torch.tensor(0.07, dtype=torch.float64)
    out = itc_loss(img, txt, temp, WorldInfo(), image_ids=ids)
    ref = ref_itc(img, txt, img, txt, 0.07, rank=0, ids=ids, all_ids=ids)
    assert out.loss.item() == pytest.approx(ref, rel=1e-10)
    assert out.sim_i2t.shape == out.sim_t2i.shape == (5, 5)
    assert not out.sim_i2t.requires_grad


@pytest.mark.parametrize("with_ids", [False, True])
def test_itc_matches_definition_as_rank_one_of_three(with_ids: bool) -> None:
    # This process plays rank 1; ranks 0 and 2 contribute fixed features (and ids).
    feats = [make_feats(4, 2, 3, seed=s) for s in (1, 2, 3)]
    ids = [torch.tensor([0, 1, 1, 2]), torch.tensor([2, 5, 6, 0]), torch.tensor([5, 9, 9, 9])]
    # gather order inside itc_loss: text, image, then (with ids) image ids
    others = {r: [feats[r][1], feats[r][0], ids[r]] for r in (0, 2)}
    world = fake_world(1, 3, others)
    img, txt = feats[1]
    out = itc_loss(img, txt, torch.tensor(0.1, dtype=torch.float64), world,
                   image_ids=ids[1] if with_ids else None)
    all_img = torch.cat([f[0] for f in feats])
    all_txt = torch.cat([f[1] for f in feats])
    ref = ref_itc(img, txt, all_img, all_txt, 0.1, rank=1,
                  ids=ids[1] if with_ids else None, all_ids=torch.cat(ids))
    assert out.sim_i2t.shape == (4, 12)
    assert out.loss.item() == pytest.approx(ref, rel=1e-10)


def test_soft_cross_entropy_equals_torch_label_smoothing_for_one_hot() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 9, (6,), generator=g)
    onehot = torch.nn.functional.one_hot(targets, 9).double()
    expected = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=LS)
    assert soft_cross_entropy(logits, onehot, LS).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("with_ids", [False, True])
def test_itc_gradient_rule(with_ids: bool) -> None:
    """image→text trains only the image side, text→image only the text side; temp gets both."""
    base_img, base_txt = make_feats(4, 3, 5, seed=4)
    ids = torch.tensor([1, 1, 2, 3]) if with_ids else None
    for direction in ("loss_i2t", "loss_t2i"):
        img = base_img.clone().requires_grad_(True)
        txt = base_txt.clone().requires_grad_(True)
        temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
        getattr(itc_loss(img, txt, temp, WorldInfo(), image_ids=ids), direction).backward()
        img_grad = 0.0 if img.grad is None else img.grad.abs().sum().item()
        txt_grad = 0.0 if txt.grad is None else txt.grad.abs().sum().item()
        if direction == "loss_i2t":
            assert img_grad > 0 and txt_grad == 0
        else:
            assert txt_grad > 0 and img_grad == 0
        assert temp.grad is not None and temp.grad.abs().item() > 0


def test_itc_gradient_equals_detached_reference() -> None:
    """The full loss's gradients are those of the definition with the gathered operand detached."""
    base_img, base_txt = make_feats(3, 2, 4, seed=5)
    img = base_img.clone().requires_grad_(True)
    txt = base_txt.clone().requires_grad_(True)
    itc_loss(img, txt, torch.tensor(0.07, dtype=torch.float64), WorldInfo()).loss.backward()

    ref_img = base_img.clone().requires_grad_(True)
    ref_txt = base_txt.clone().requires_grad_(True)
    total = 0.0
    for i in range(3):
        # explicit per-pair max over queries; the other side is a constant in each direction
        i2t = torch.stack([(ref_img[i] @ base_txt[j]).max() for j in range(3)]) / 0.07
        t2i = torch.stack([(base_img[j] @ ref_txt[i]).max() for j in range(3)]) / 0.07
        q = torch.full((3,), LS / 3, dtype=torch.float64)
        q[i] += 1 - LS
        total = total + 0.5 * (-(q * (i2t - torch.log(torch.exp(i2t).sum()))).sum()
                               - (q * (t2i - torch.log(torch.exp(t2i).sum()))).sum())
    (total / 3).backward()
    torch.testing.assert_close(img.grad, ref_img.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(txt.grad, ref_txt.grad, rtol=1e-10, atol=1e-12)


def ref_negative_weights(sim_row: torch.Tensor, positive: list[bool]) -> list[float]:
    w = [0.0 if p else math.exp(float(v)) for v, p in zip(sim_row, positive)]
    s = sum(w)
    return [x / s for x in w]


def test_sampling_never_draws_positives_and_follows_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    b = 4
    sim_i2t = torch.randn(b, b, generator=g) * 1.5
    sim_t2i = torch.randn(b, b, generator=g) * 1.5
    ids = torch.tensor([10, 11, 10, 12])
    positives = [[i == j or int(ids[i]) == int(ids[j]) for j in range(b)] for i in range(b)]
    draws = 4000
    counts_img = torch.zeros(b, b)
    counts_txt = torch.zeros(b, b)
    gen = torch.Generator().manual_seed(123)
    for _ in range(draws):
        neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i, WorldInfo(), image_ids=ids, generator=gen)
        counts_img[torch.arange(b), neg_img] += 1
        counts_txt[torch.arange(b), neg_txt] += 1
    for counts, sim in ((counts_img, sim_t2i), (counts_txt, sim_i2t)):
        for i in range(b):
            p = ref_negative_weights(sim[i], positives[i])
            chi2, dof = 0.0, -1
            for j in range(b):
                if positives[i][j]:
                    assert counts[i, j] == 0, f"row {i} drew its positive {j}"
                    continue
                expected = draws * p[j]
                chi2 += (counts[i, j].item() - expected) ** 2 / expected
                dof += 1
            # dof <= 2 here: chi-square 99.9% quantile at 2 dof is 13.8
            assert chi2 < 13.8, (i, chi2, counts[i], p)


def test_sampling_global_indices_on_rank_one() -> None:
    b, size = 3, 2
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(b, b * size, generator=g)
    ids = torch.tensor([4, 5, 6])
    all_ids = [5, 4, 8, 4, 5, 6]
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        world = fake_world(1, size, {0: [torch.tensor([5, 4, 8])]})
        neg_img, neg_txt = sample_hard_negatives(sim, sim.flip(1), world, image_ids=ids, generator=gen)
        for i in range(b):
            for j in (int(neg_img[i]), int(neg_txt[i])):
                assert j != b + i and all_ids[j] != int(ids[i])


def test_sampling_all_same_image_falls_back_to_other_entries() -> None:
    b = 4
    sim = torch.randn(b, b)
    ids = torch.zeros(b, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        neg_img, neg_txt = sample_hard_negatives(sim, sim, WorldInfo(), image_ids=ids, generator=gen)
        for i in range(b):
            assert int(neg_img[i]) != i and int(neg_txt[i]) != i
            seen.add((i, int(neg_img[i])))
    assert len(seen) == b * (b - 1)  # uniform over the other entries: all of them show up
    # non-finite similarities (a diverged step) do not crash the sampler
    bad = torch.full((b, b), float("nan"))
    neg_img, _ = sample_hard_negatives(bad, bad, WorldInfo(), generator=gen)
    assert all(int(neg_img[i]) != i for i in range(b))


def test_itm_loss_matches_definition() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 2, generator=g, dtype=torch.float64)
    ref = 0.0
    for r in range(9):
        target = 1 if r < 3 else 0
        lse = math.log(math.exp(float(logits[r, 0])) + math.exp(float(logits[r, 1])))
        ref += -(float(logits[r, target]) - lse)
    assert itm_loss(logits).item() == pytest.approx(ref / 9, rel=1e-12)


def test_itg_loss_matches_definition() -> None:
    g = torch.Generator().manual_seed(3)
    b, t, v = 3, 6, 7
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 4:] = -100
    labels[2, 2:] = -100
    total, count = 0.0, 0
    for i in range(b):
        for pos in range(t - 1):
            target = int(labels[i, pos + 1])  # position pos predicts the next token
            if target == -100:
                continue
            row = [float(x) for x in logits[i, pos]]
            total += ref_ce(row, [1.0 if k == target else 0.0 for k in range(v)])
            count += 1
    assert itg_loss(logits, labels).item() == pytest.approx(total / count, rel=1e-12)
