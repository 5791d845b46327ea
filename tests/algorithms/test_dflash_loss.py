"""DFlash objective: anchor sampler invariants, labels, CE / D-PACE losses and gradients against naive loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.dflash.loss import (
    anchor_seed,
    block_counts,
    block_labels,
    dflash_loss,
    dpace_weights,
    sample_anchors,
    valid_anchors,
)


def _mask():
    lm = torch.zeros(3, 20, dtype=torch.long)
    lm[0, 2:9] = 1
    lm[0, 12:20] = 1
    lm[1, 5:7] = 1  # exactly one valid anchor (5)
    lm[2, ::2] = 1  # no two adjacent supervised tokens
    return lm


def test_anchor_sampler_valid_unique_sorted_and_deterministic():
    lm = _mask()
    valid = valid_anchors(lm)
    assert valid[0, 18] and not valid[0, 19] and valid[1].nonzero().flatten().tolist() == [5] and not valid[2].any()
    seeds = [anchor_seed(0, 3, f"s{i}") for i in range(3)]
    anchors, keep = sample_anchors(lm, 5, seeds)
    assert anchors.shape == (3, 5) and keep.sum(1).tolist() == [5, 1, 0]
    for b in range(3):
        picked = anchors[b][keep[b]].tolist()
        assert picked == sorted(set(picked))  # sorted, no duplicates
        assert all(valid[b, a] for a in picked)  # valid anchors only
    again = sample_anchors(lm, 5, seeds)
    assert torch.equal(again[0], anchors) and torch.equal(again[1], keep)
    other = sample_anchors(lm, 5, [anchor_seed(0, 4, f"s{i}") for i in range(3)])[0]
    assert not torch.equal(other[0], anchors[0])  # another step draws other anchors
    everything = sample_anchors(lm, 100, seeds)
    assert everything[0][0][everything[1][0]].tolist() == valid[0].nonzero().flatten().tolist()


def test_anchor_sampler_is_uniform_over_valid_positions():
    lm = torch.zeros(1, 12, dtype=torch.long)
    lm[0, 2:10] = 1  # valid anchors 2..8
    hits = torch.zeros(12)
    for s in range(700):
        a, k = sample_anchors(lm, 2, [s])
        hits[a[k]] += 1
    freq = hits[2:9] / 700
    assert hits[:2].sum() == 0 and hits[9:].sum() == 0
    assert torch.allclose(freq, torch.full_like(freq, 2 / 7), atol=0.06)


def test_block_labels_against_naive():
    S, bs = 10, 4
    ids = torch.arange(100, 100 + S)[None]
    lm = torch.ones(1, S, dtype=torch.long)
    lm[0, 8] = 0
    anchors, keep = torch.tensor([[1, 7, 0]]), torch.tensor([[True, True, False]])
    for shift in (0, 1):
        labels, w = block_labels(ids, lm, anchors, keep, bs, shift)
        assert labels.shape == (1, 3, bs - 1 + shift)
        for n in range(3):
            for p in range(bs - 1 + shift):
                pos = int(anchors[0, n]) + p + 1  # predicted position p always targets a+p+1
                ok = bool(keep[0, n]) and pos < S and bool(lm[0, pos])
                assert bool(w[0, n, p]) == ok
                if ok:
                    assert int(labels[0, n, p]) == 100 + pos


def _setup(seed=0, B=2, N=3, P=4, Hd=6, V=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, N, P, Hd, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(V, Hd, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, N, P), generator=g)
    w = torch.rand(B, N, P, generator=g) > 0.25
    keep = torch.tensor([[True, True, True], [True, True, False]])
    w &= keep[..., None]
    return hidden, head, labels, w, keep


def _naive_ce(hidden, head, labels, w, gamma):
    num = den = 0.0
    B, N, P, _ = hidden.shape
    for b in range(B):
        for n in range(N):
            for p in range(P):
                if w[b, n, p]:
                    d = 1.0 if gamma is None else math.exp(-p / gamma)  # upstream exp(-(j-1)/γ), j = p+1
                    num = num + d * F.cross_entropy((hidden[b, n, p] @ head.T)[None], labels[b, n, p][None])
                    den += d
    return num / den


@pytest.mark.parametrize("gamma,chunk", [(None, 0), (7.0, 0), (2.0, 3)])
def test_ce_loss_and_gradient_match_naive(gamma, chunk):
    hidden, head, labels, w, keep = _setup()
    out = dflash_loss(hidden, labels, w, keep, lambda x: x @ head.T, "dflash", gamma=gamma, chunk=chunk)
    (g,) = torch.autograd.grad(out.loss, hidden)
    want = _naive_ce(hidden, head, labels, w, gamma)
    (g_want,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(g, g_want)
    assert float(out.denominator) == pytest.approx(
        sum(1.0 if gamma is None else math.exp(-int(p) / gamma) for *_, p in w.nonzero())
    )


def _naive_dpace(hidden, head, labels, w, alpha, kind):
    B, N, P, _ = hidden.shape
    total = 0.0
    for b in range(B):
        for n in range(N):
            ce = [F.cross_entropy((hidden[b, n, p] @ head.T)[None], labels[b, n, p][None]) for p in range(P)]
            s = [((1 - alpha) * math.exp(-float(ce[p].detach())) + alpha) if w[b, n, p] else 1.0 for p in range(P)]
            prefix = [math.prod(s[: p + 1]) for p in range(P)]
            for p in range(P):
                if not w[b, n, p]:
                    continue
                suffix = sum(prefix[i] * float(w[b, n, i]) for i in range(p, P))
                weight = {"dpace": suffix, "dpace-cumulative-confidence-only": prefix[p],
                          "dpace-continuation-value-only": suffix / prefix[p]}[kind]
                total = total + ce[p] * weight
    return total / B


@pytest.mark.parametrize("kind", ["dpace", "dpace-cumulative-confidence-only", "dpace-continuation-value-only"])
def test_dpace_loss_and_gradient_match_naive(kind):
    hidden, head, labels, w, keep = _setup(seed=1)
    out = dflash_loss(hidden, labels, w, keep, lambda x: x @ head.T, kind, alpha=0.3)
    want = _naive_dpace(hidden, head, labels, w, 0.3, kind)
    torch.testing.assert_close(out.loss, want)
    (g,) = torch.autograd.grad(out.loss, hidden)
    (g_want,) = torch.autograd.grad(want, hidden)  # weights are constants: q is detached in both
    torch.testing.assert_close(g, g_want)
    assert float(out.denominator) == 2.0  # D-PACE divides by the batch size


def test_dpace_weights_are_detached():
    ce = torch.rand(1, 1, 3, requires_grad=True)
    assert not dpace_weights(ce, torch.ones(1, 1, 3, dtype=torch.bool), 0.5).requires_grad


def test_counts_per_position_and_block_acceptance_length():
    hit = torch.tensor([[[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]]], dtype=torch.bool)
    w = torch.tensor([[[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1]]], dtype=torch.bool)
    keep = torch.tensor([[True, True, True]])
    c = block_counts(hit, w, keep)
    assert c.correct.tolist() == [2, 3, 1, 3] and c.total.tolist() == [3, 3, 2, 3]
    # leading correct: 2, 0, 2 (an unscored slot ends the run) → (3 + 1 + 3) / 3 blocks
    assert int(c.accepted) == 7 and int(c.blocks) == 3 and c.acceptance_length == pytest.approx(7 / 3)
    c2 = block_counts(hit, w, torch.tensor([[True, True, False]]))
    assert int(c2.accepted) == 4 and int(c2.blocks) == 2
