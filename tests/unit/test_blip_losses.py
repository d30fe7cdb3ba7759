"""ALBEF / BLIP losses and momentum pieces against direct float64 evaluations (DESIGN.md §11).

The references are written from the definitions with explicit loops, exp and log, and share no
code with `blip_train.models.blip_losses`.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from blip_train.models.blip_losses import (FeatureQueue, alpha_at, copy_params_, global_sims, lm_loss,
                                           mask_tokens, mlm_loss, momentum_itc_loss, momentum_update_)
from blip_train.models.world import WorldInfo


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True)


def ref_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_momentum_itc(img, txt, img_m, txt_m, img_q, txt_q, temp: float, alpha: float,
                     idx=None, idx_q=None, ls: float = 0.0) -> dict[str, float]:
    """Float64 loops: columns are [local momentum batch; queue]; returns loss terms and the targets."""
    b, e = img.shape
    q = img_q.shape[1]
    img_cols = [[float(img_m[j, k]) for k in range(e)] for j in range(b)] + \
               [[float(img_q[k, j]) for k in range(e)] for j in range(q)]
    txt_cols = [[float(txt_m[j, k]) for k in range(e)] for j in range(b)] + \
               [[float(txt_q[k, j]) for k in range(e)] for j in range(q)]
    col_ids = None if idx is None else [int(v) for v in idx] + [int(idx_q[0, j]) for j in range(q)]
    c = b + q

    def dot(a: torch.Tensor, i: int, col: list[float]) -> float:
        return sum(float(a[i, k]) * col[k] for k in range(e))

    out = {"loss_i2t": 0.0, "loss_t2i": 0.0, "targets_i2t": [], "targets_t2i": [], "sim_i2t": [], "sim_t2i": []}
    for i in range(b):
        if col_ids is None:
            hard = [1.0 if j == i else 0.0 for j in range(c)]
        else:
            same = [1.0 if col_ids[j] == int(idx[i]) else 0.0 for j in range(c)]
            hard = [s / sum(same) for s in same]
        for name, online, mom, cols in (("i2t", img, img_m, txt_cols), ("t2i", txt, txt_m, img_cols)):
            sim = [dot(online, i, col) / temp for col in cols]
            sim_m = [dot(mom, i, col) / temp for col in cols]
            z = sum(math.exp(v) for v in sim_m)
            target = [alpha * math.exp(v) / z + (1 - alpha) * h for v, h in zip(sim_m, hard)]
            smoothed = [(1 - ls) * t + ls / c for t in target]
            out["loss_" + name] += -sum(t * lp for t, lp in zip(smoothed, ref_log_softmax(sim))) / b
            out["targets_" + name].append(target)
            out["sim_" + name].append(sim)
    out["loss"] = (out["loss_i2t"] + out["loss_t2i"]) / 2
    return out


def make_itc_inputs(b: int, e: int, q: int, seed: int, with_idx: bool):
    g = torch.Generator().manual_seed(seed)
    feats = [unit(torch.randn(b, e, generator=g, dtype=torch.float64)) for _ in range(4)]
    queue = FeatureQueue(e, q, with_idx=with_idx, generator=g).double()
    if with_idx:
        queue.idx_queue.copy_(torch.randint(0, 4, (1, q), generator=g))
    idx = torch.tensor([0, 2, 0, 3, 5][:b]) if with_idx else None
    return feats, queue, idx


@pytest.mark.parametrize("with_idx", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_momentum_itc_matches_definition(with_idx: bool, alpha: float, ls: float) -> None:
    (img, txt, img_m, txt_m), queue, idx = make_itc_inputs(5, 4, 10, seed=0, with_idx=with_idx)
    out = momentum_itc_loss(img, txt, img_m, txt_m, queue, torch.tensor(0.07, dtype=torch.float64), alpha,
                            idx=idx, label_smoothing=ls)
    ref = ref_momentum_itc(img, txt, img_m, txt_m, queue.image_queue, queue.text_queue, 0.07, alpha,
                           idx=idx, idx_q=queue.idx_queue, ls=ls)
    for name in ("loss", "loss_i2t", "loss_t2i"):
        assert getattr(out, name).item() == pytest.approx(ref[name], rel=1e-10), name
    for name in ("sim_i2t", "sim_t2i"):
        sim = getattr(out, name)
        assert sim.shape == (5, 15) and not sim.requires_grad
        torch.testing.assert_close(sim, torch.tensor(ref[name], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    if with_idx:  # the data exercise positives in the queue, not only the own column
        assert any(int(v) in queue.idx_queue[0].tolist() for v in idx)


def test_momentum_itc_soft_targets_are_the_gradient_fixed_point() -> None:
    """d loss_i2t / d sim_i2t = (softmax(sim_i2t) - targets) / B: recovers the soft targets exactly."""
    (img, txt, img_m, txt_m), queue, idx = make_itc_inputs(4, 3, 8, seed=1, with_idx=True)
    temp = 0.1
    ref = ref_momentum_itc(img, txt, img_m, txt_m, queue.image_queue, queue.text_queue, temp, 0.4,
                           idx=idx, idx_q=queue.idx_queue)
    # Reconstruct the targets from the image gradient: dL/dimg_i = sum_j (p_ij - t_ij) txt_col_j / (temp B)
    img_g = img.clone().requires_grad_(True)
    momentum_itc_loss(img_g, txt, img_m, txt_m, queue, temp, 0.4, idx=idx).loss_i2t.backward()
    cols = torch.cat([txt_m.T, queue.text_queue], dim=1)  # (E, B+Q)
    for i in range(4):
        p = [math.exp(v) for v in ref["sim_i2t"][i]]
        p = [v / sum(p) for v in p]
        expected = sum((p[j] - ref["targets_i2t"][i][j]) * cols[:, j] for j in range(12)) / (temp * 4)
        torch.testing.assert_close(img_g.grad[i], expected, rtol=1e-9, atol=1e-12)
        assert sum(ref["targets_i2t"][i]) == pytest.approx(1.0, rel=1e-12)


def test_momentum_itc_gradient_only_to_online_features() -> None:
    (img, txt, img_m, txt_m), queue, _ = make_itc_inputs(4, 5, 8, seed=2, with_idx=False)
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    # even if the caller forgot to detach them, the momentum features get no gradient
    img_m, txt_m = img_m.clone().requires_grad_(True), txt_m.clone().requires_grad_(True)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    out = momentum_itc_loss(img, txt, img_m, txt_m, queue, temp, 0.4)
    out.loss.backward()
    assert img_m.grad is None and txt_m.grad is None
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0 and temp.grad.abs() > 0
    assert not any(t.requires_grad for t in queue.buffers())
    # each direction trains its own online side only
    img2, txt2 = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    momentum_itc_loss(img2, txt2, img_m, txt_m, queue, 0.07, 0.4).loss_i2t.backward()
    assert img2.grad.abs().sum() > 0 and txt2.grad is None


def test_momentum_itc_bf16_inputs_computed_in_fp32() -> None:
    (img, txt, img_m, txt_m), queue, _ = make_itc_inputs(4, 8, 8, seed=3, with_idx=False)
    queue = queue.float()
    out = momentum_itc_loss(img.bfloat16(), txt.bfloat16(), img_m.bfloat16(), txt_m.bfloat16(), queue,
                            torch.tensor(0.07, dtype=torch.bfloat16), 0.4)
    assert out.loss.dtype == torch.float32 and out.sim_i2t.dtype == torch.float32
    ref = ref_momentum_itc(img.bfloat16().double(), txt.bfloat16().double(), img_m.bfloat16().double(),
                           txt_m.bfloat16().double(), queue.image_queue, queue.text_queue,
                           float(torch.tensor(0.07, dtype=torch.bfloat16)), 0.4)
    assert out.loss.item() == pytest.approx(ref["loss"], rel=1e-4)


def test_momentum_itc_idx_needs_idx_queue() -> None:
    (img, txt, img_m, txt_m), queue, _ = make_itc_inputs(3, 4, 6, seed=4, with_idx=False)
    with pytest.raises(ValueError, match="with_idx"):
        momentum_itc_loss(img, txt, img_m, txt_m, queue, 0.07, 0.4, idx=torch.tensor([1, 2, 3]))


def test_queue_init_and_state_dict() -> None:
    queue = FeatureQueue(6, 12, with_idx=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(queue.image_queue.norm(dim=0), torch.ones(12))
    torch.testing.assert_close(queue.text_queue.norm(dim=0), torch.ones(12))
    assert (queue.idx_queue == -100).all() and queue.ptr.tolist() == [0]
    assert set(queue.state_dict()) == {"image_queue", "text_queue", "idx_queue", "ptr"}
    assert set(FeatureQueue(6, 12).state_dict()) == {"image_queue", "text_queue", "ptr"}
    g = torch.Generator().manual_seed(1)
    queue.enqueue_(unit(torch.randn(4, 6, generator=g)), unit(torch.randn(4, 6, generator=g)), torch.arange(4))
    restored = FeatureQueue(6, 12, with_idx=True)
    restored.load_state_dict(queue.state_dict())
    for name, buf in queue.state_dict().items():
        assert torch.equal(restored.state_dict()[name], buf), name


def test_queue_enqueue_wraps_around() -> None:
    e, q, g_rows = 3, 6, 2
    queue = FeatureQueue(e, q, with_idx=True, generator=torch.Generator().manual_seed(0))
    # reference: plain python lists of columns
    img_cols = [[float(queue.image_queue[k, j]) for k in range(e)] for j in range(q)]
    txt_cols = [[float(queue.text_queue[k, j]) for k in range(e)] for j in range(q)]
    ids = [-100] * q
    ptr = 0
    g = torch.Generator().manual_seed(5)
    for step in range(5):  # 5 * 2 = 10 rows into 6 slots: wraps once, overwrites the oldest
        img = torch.randn(g_rows, e, generator=g)
        txt = torch.randn(g_rows, e, generator=g)
        idx = torch.arange(g_rows) + 10 * step
        queue.enqueue_(img, txt, idx)
        for r in range(g_rows):
            img_cols[ptr] = [float(v) for v in img[r]]
            txt_cols[ptr] = [float(v) for v in txt[r]]
            ids[ptr] = int(idx[r])
            ptr = (ptr + 1) % q
        assert queue.ptr.tolist() == [ptr]
    torch.testing.assert_close(queue.image_queue, torch.tensor(img_cols).T)
    torch.testing.assert_close(queue.text_queue, torch.tensor(txt_cols).T)
    assert queue.idx_queue.tolist() == [ids]
    assert ids == [30, 31, 40, 41, 20, 21]  # steps write at 0, 2, 4, 0, 2


def test_queue_checks() -> None:
    queue = FeatureQueue(3, 6, with_idx=True)
    feats = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"model\.queue_size \(6\).*global batch \(4"):
        queue.enqueue_(feats, feats, torch.arange(4))
    with pytest.raises(ValueError, match="with_idx"):
        queue.enqueue_(feats[:3], feats[:3])
    with pytest.raises(ValueError, match="with_idx"):
        FeatureQueue(3, 6).enqueue_(feats[:3], feats[:3], torch.arange(3))
    with pytest.raises(ValueError, match="feature tensors"):
        queue.enqueue_(feats[:3], torch.randn(3, 4), torch.arange(3))


def test_momentum_update_bf16_online_fp32_momentum() -> None:
    g = torch.Generator().manual_seed(0)
    online = [torch.randn(5, 7, generator=g).bfloat16(), torch.randn(11, generator=g).bfloat16()]
    mom = [torch.randn(5, 7, generator=g), torch.randn(11, generator=g)]
    before = [m.double().clone() for m in mom]
    online_before = [p.clone() for p in online]
    momentum_update_(zip(online, mom), 0.995)
    for p, m, m0, p0 in zip(online, mom, before, online_before):
        assert m.dtype == torch.float32 and torch.equal(p, p0)
        flat_m, flat_m0, flat_p = m.reshape(-1), m0.reshape(-1), p.reshape(-1)
        for k in range(flat_m.numel()):
            expected = float(flat_m0[k]) * 0.995 + float(flat_p[k]) * (1 - 0.995)
            assert float(flat_m[k]) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_momentum_update_on_shards_and_copy() -> None:
    """ZeRO-3 passes flat local partitions: views into a flat buffer are updated in place."""
    online_full = torch.arange(12, dtype=torch.float32).bfloat16()
    mom_full = torch.zeros(12)
    shards = [(online_full[0:5], mom_full[0:5]), (online_full[5:12], mom_full[5:12])]
    copy_params_(shards)
    torch.testing.assert_close(mom_full, online_full.float())
    momentum_update_(iter([(online_full[5:12] * 0 + 1, mom_full[5:12])]), 0.5)  # any iterable
    torch.testing.assert_close(mom_full[5:], (torch.arange(5, 12.0) + 1) / 2)
    torch.testing.assert_close(mom_full[:5], torch.arange(5.0))
    with pytest.raises(ValueError, match="shape"):
        momentum_update_([(torch.zeros(3), torch.zeros(4))], 0.9)
    p = torch.nn.Parameter(torch.ones(3))
    m = torch.zeros(3)
    momentum_update_([(p, m)], 0.9)  # a Parameter with grad: no autograd graph is built
    assert not m.requires_grad and m.grad_fn is None


def test_global_sims_one_rank_and_rank_one_of_two() -> None:
    g = torch.Generator().manual_seed(0)
    img = unit(torch.randn(6, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    txt = unit(torch.randn(6, 4, generator=g, dtype=torch.float64))
    sim_i2t, sim_t2i = global_sims(img, txt, 0.05, WorldInfo())
    assert sim_i2t.shape == (6, 6) and not sim_i2t.requires_grad
    img = img.detach()
    for i in range(6):
        for j in range(6):
            assert float(sim_i2t[i, j]) == pytest.approx(sum(float(img[i, k] * txt[j, k]) for k in range(4)) / 0.05)
            assert float(sim_t2i[i, j]) == pytest.approx(sum(float(txt[i, k] * img[j, k]) for k in range(4)) / 0.05)
    # as rank 1 of 2: the local rows are the second half, the columns the whole batch
    parts = iter([img[:3], txt[:3]])  # what rank 0 contributes, in gather order (image, text)

    def gather(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([next(parts), x]).detach()

    s_i2t, s_t2i = global_sims(img[3:], txt[3:], 0.05, WorldInfo(rank=1, size=2, gather=gather))
    assert s_i2t.shape == (3, 6)
    torch.testing.assert_close(s_i2t, sim_i2t[3:])
    torch.testing.assert_close(s_t2i, sim_t2i[3:])


def make_ids(b: int, t: int, vocab: int, seed: int) -> torch.Tensor:
    """[CLS] text [SEP] [PAD]...: CLS=1, SEP=2, PAD=0, MASK=3, words in [5, vocab)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    for i in range(b):
        n = int(lengths[i])
        ids[i, 0], ids[i, n - 1] = 1, 2
        ids[i, n:] = 0
    return ids


def test_mask_tokens_statistics() -> None:
    vocab, specials = 30522, (0, 1, 2)
    ids = make_ids(400, 300, vocab, seed=0)
    original = ids.clone()
    masked, labels = mask_tokens(ids, vocab, 3, specials, torch.Generator().manual_seed(0))
    assert torch.equal(ids, original)  # not modified in place
    special = (ids == 0) | (ids == 1) | (ids == 2)
    chosen = labels != -100
    assert not (chosen & special).any() and torch.equal(masked[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens never change
    n_eligible, n_chosen = int((~special).sum()), int(chosen.sum())
    assert n_eligible > 50000
    assert abs(n_chosen / n_eligible - 0.15) < 0.006  # std ~0.0013
    to_mask = chosen & (masked == 3)
    to_random = chosen & (masked != 3) & (masked != ids)
    kept = chosen & (masked == ids)
    assert abs(int(to_mask.sum()) / n_chosen - 0.8) < 0.02  # std ~0.003
    assert abs(int(to_random.sum()) / n_chosen - 0.1) < 0.015  # std ~0.0025
    assert abs(int(kept.sum()) / n_chosen - 0.1) < 0.015
    assert int(masked.min()) >= 0 and int(masked.max()) < vocab
    # random replacements spread over the vocabulary
    assert masked[to_random].unique().numel() > 0.8 * int(to_random.sum())


def test_mask_tokens_deterministic_given_generator() -> None:
    ids = make_ids(8, 20, 100, seed=1)
    a = mask_tokens(ids, 100, 3, [0, 1, 2], torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    b = mask_tokens(ids, 100, 3, [0, 1, 2], torch.Generator().manual_seed(7))
    torch.manual_seed(1)  # the global RNG plays no part
    c = mask_tokens(ids, 100, 3, [0, 1, 2], torch.Generator().manual_seed(7))
    d = mask_tokens(ids, 100, 3, [0, 1, 2], torch.Generator().manual_seed(8))
    for x, y in ((a, b), (a, c)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert not torch.equal(a[1], d[1])
    # the generator advances by a fixed amount, whatever the content
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mask_tokens(ids, 100, 3, [0, 1, 2], g1)
    mask_tokens(torch.zeros_like(ids), 100, 3, [0, 1, 2], g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def ref_mlm(logits: torch.Tensor, labels: torch.Tensor, logits_m: Optional[torch.Tensor], alpha: float) -> float:
    logits = logits.detach()
    logits_m = None if logits_m is None else logits_m.detach()
    b, t, v = logits.shape
    ce, distill, n = 0.0, 0.0, 0
    for i in range(b):
        for p in range(t):
            y = int(labels[i, p])
            if y == -100:
                continue
            logp = ref_log_softmax([float(x) for x in logits[i, p]])
            ce += -logp[y]
            if logits_m is not None:
                row_m = [float(x) for x in logits_m[i, p]]
                z = sum(math.exp(x) for x in row_m)
                distill += -sum(math.exp(x) / z * lp for x, lp in zip(row_m, logp))
            n += 1
    if logits_m is None:
        return ce / n
    return (1 - alpha) * ce / n + alpha * distill / n


@pytest.mark.parametrize("distil", [False, True])
def test_mlm_loss_matches_definition(distil: bool) -> None:
    g = torch.Generator().manual_seed(0)
    b, t, v = 3, 7, 11
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64, requires_grad=True)
    logits_m = torch.randn(b, t, v, generator=g, dtype=torch.float64, requires_grad=True) if distil else None
    labels = torch.full((b, t), -100)
    for i, p, y in ((0, 1, 4), (0, 5, 0), (1, 2, 10), (2, 0, 3), (2, 6, 7)):
        labels[i, p] = y
    loss = mlm_loss(logits, labels, logits_m, alpha=0.4 if distil else 0.0)
    assert loss.item() == pytest.approx(ref_mlm(logits, labels, logits_m, 0.4), rel=1e-12)
    loss.backward()
    assert logits.grad is not None
    if distil:
        assert logits_m.grad is None
        # alpha 0 with momentum logits is plain CE
        assert mlm_loss(logits, labels, logits_m, 0.0).item() == pytest.approx(ref_mlm(logits, labels, None, 0.0))


def test_mlm_loss_bf16_and_nothing_chosen() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g)
    labels = torch.tensor([[-100, 3, -100, 8], [0, -100, -100, -100]])
    loss = mlm_loss(logits.bfloat16(), labels, logits.flip(0).bfloat16(), 0.4)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_mlm(logits.bfloat16().double(), labels,
                                                logits.flip(0).bfloat16().double(), 0.4), rel=1e-5)
    empty = mlm_loss(logits, torch.full((2, 4), -100), logits, 0.4)
    assert empty.item() == 0.0  # not NaN: a batch with nothing masked does not poison the step


def test_lm_loss_is_shifted_ce_with_smoothing_point_one() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, 5, 0, -100, -100]])  # [DEC] and padding ignored
    total, n = 0.0, 0
    for i in range(2):
        for p in range(4):
            y = int(labels[i, p + 1])
            if y == -100:
                continue
            logp = ref_log_softmax([float(x) for x in logits[i, p]])
            total += -sum((0.9 * (k == y) + 0.1 / 6) * logp[k] for k in range(6))
            n += 1
    assert lm_loss(logits, labels).item() == pytest.approx(total / n, rel=1e-12)


def test_alpha_at() -> None:
    assert alpha_at(0, 0.4, 100) == 0.0
    assert alpha_at(25, 0.4, 100) == pytest.approx(0.1)
    assert alpha_at(100, 0.4, 100) == pytest.approx(0.4)
    assert alpha_at(5000, 0.4, 100) == pytest.approx(0.4)
    assert alpha_at(0, 0.4, 0) == 0.4 and alpha_at(7, 0.4, 0) == 0.4
    with pytest.raises(ValueError, match="ramp_steps"):
        alpha_at(1, 0.4, -1)
