"""DSpark's heads, loss, metrics and gradients against a deliberately naive reference (explicit loops and masks)."""

from __future__ import annotations

import math

import pytest
import torch

from specforge_lightning.algorithms.dflash.loss import block_labels
from specforge_lightning.algorithms.dspark import DSparkConfig, DSparkDraft, DSparkMetric, dspark_loss

V, H, BS, R = 40, 16, 4, 8


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_draft(kind: str = "vanilla", rank: int = R, confidence: bool = True, with_markov: bool = True,
               seed: int = 0) -> DSparkDraft:
    config = DSparkConfig(
        hidden_size=H, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
        rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None, max_position_embeddings=64, vocab_size=V,
        target_layer_ids=(1, 2), mask_token_id=0, block_size=BS, markov_rank=rank, markov_head_type=kind,
        enable_confidence_head=confidence, confidence_head_with_markov=with_markov and rank > 0,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draft = DSparkDraft(config)
        for p in draft.parameters():  # larger weights than the init, so every term matters
            p.data.normal_(0.0, 0.5, generator=g)
    draft.set_target_weights(torch.randn(V, H, generator=g), torch.randn(V, H, generator=g))
    return draft.double()


def make_inputs(seed: int = 1):
    """Two samples, three blocks each (one padded), a loss-mask hole inside a block and a block past the end."""
    g = torch.Generator().manual_seed(seed)
    B, S, N = 2, 12, 3
    ids = torch.randint(0, V, (B, S), generator=g)
    lm = torch.ones(B, S, dtype=torch.long)
    lm[0, 6] = 0  # the block at 3 scores slots 0..1 only (labels 4, 5), not 7 after the hole
    anchors = torch.tensor([[0, 3, 8], [1, 5, 10]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    hidden = torch.randn(B, N, BS, H, generator=g, dtype=torch.float64).requires_grad_(True)
    last = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    labels, w = block_labels(ids, lm, anchors, keep, BS, shift=1)
    prev_pos = (anchors[..., None] + torch.arange(BS)).clamp(max=S - 1)
    prev = ids.gather(1, prev_pos.reshape(B, -1)).view(prev_pos.shape)
    teacher = last.gather(1, prev_pos.reshape(B, -1, 1).expand(-1, -1, H)).view(B, N, BS, H)
    return dict(ids=ids, lm=lm, anchors=anchors, keep=keep, hidden=hidden, last=last, labels=labels, w=w,
                prev=prev, teacher=teacher)


# --------------------------------------------------------------------------- the naive reference


def rms(x, weight, eps=1e-6):
    return x / torch.sqrt((x * x).mean() + eps) * weight


def naive(draft: DSparkDraft, x: dict, alpha_ce: float, alpha_l1: float, alpha_conf: float, gamma: float | None):
    """Loop over every sample, block and slot, straight from the reference notes' formulas."""
    c = draft.config
    mh, ch = draft.markov_head, draft.confidence_head
    ids, lm, anchors, keep, hidden, last = x["ids"], x["lm"], x["anchors"], x["keep"], x["hidden"], x["last"]
    B, S = ids.shape
    num = ce_s = l1_s = bce_s = den = 0.0
    err = agree = t_top = d_top = tau = 0.0
    tokens = blocks = accepted = 0
    correct, total = [0] * BS, [0] * BS
    ce_pos = [0.0] * BS
    for b in range(B):
        for n in range(anchors.shape[1]):
            if not keep[b, n]:
                continue
            a = int(anchors[b, n])
            blocks += 1
            state = torch.zeros(R, dtype=torch.float64)
            run, lead_ok, lead, reach = True, True, 0, 1.0
            block_tau = 1.0
            for j in range(BS):
                label_pos = a + 1 + j
                if label_pos >= S or not lm[b, label_pos]:
                    run = False
                prev = int(ids[b, a + j]) if a + j < S else int(ids[b, S - 1])
                h = rms(hidden[b, n, j], draft.norm.weight)
                logits = draft.lm_head.weight @ h
                e = mh.markov_w1.weight[prev] if mh is not None else None
                if mh is not None:
                    if mh.kind == "vanilla":
                        z = e
                    elif mh.kind == "gated":
                        z = torch.sigmoid(mh.gate_proj.weight @ torch.cat([h, e]) + mh.gate_proj.bias) * e
                    else:
                        gco = mh.joint_proj.weight @ torch.cat([state, e, h]) + mh.joint_proj.bias
                        gate, cand, o = gco[:R], gco[R : 2 * R], gco[2 * R :]
                        state = torch.sigmoid(gate) * state + (1 - torch.sigmoid(gate)) * torch.tanh(cand)
                        z = torch.tanh(o)
                    logits = logits + mh.markov_w2.weight @ z
                if not run:
                    continue
                y = int(ids[b, label_pos])
                p_d = torch.softmax(logits, 0)
                p_t = torch.softmax(draft.lm_head.weight @ last[b, a + j], 0)
                ce = -torch.log(p_d[y])
                l1 = sum(abs(p_d[v] - p_t[v]) for v in range(V))
                acc = min(max(1.0 - float(l1.detach()) / 2, 0.0), 1.0)
                wt = 1.0 if gamma is None else math.exp(-j / gamma)
                bce = 0.0
                if ch is not None:
                    feats = torch.cat([h, e]) if c.confidence_head_with_markov else h
                    q = torch.sigmoid(ch.proj.weight[0] @ feats + ch.proj.bias[0])
                    bce = -(acc * torch.log(q) + (1 - acc) * torch.log(1 - q))
                    err += abs(float(q.detach()) - acc)
                num = num + (alpha_ce * ce + alpha_l1 * l1 + alpha_conf * bce) * wt
                ce_s, l1_s, bce_s, den = ce_s + float(ce) * wt, l1_s + float(l1) * wt, bce_s + float(bce) * wt, den + wt
                pred = int(torch.argmax(logits))
                agree += float(pred == int(torch.argmax(p_t)))
                t_top, d_top = t_top + float(p_t.max()), d_top + float(p_d.max())
                tokens += 1
                total[j] += 1
                correct[j] += int(pred == y)
                ce_pos[j] += float(ce)
                lead_ok = lead_ok and pred == y
                lead += int(lead_ok)
                reach *= acc
                block_tau += reach
            accepted += lead + 1
            tau += block_tau
    return dict(num=num, den=den, ce=ce_s, l1=l1_s, bce=bce_s, err=err, agree=agree, t_top=t_top, d_top=d_top,
                tau=tau, tokens=tokens, blocks=blocks, accepted=accepted, correct=correct, total=total, ce_pos=ce_pos)


def fast(draft, x, alpha_ce, alpha_l1, alpha_conf, gamma, chunk=0):
    return dspark_loss(draft, x["hidden"], x["labels"], x["w"], x["keep"], x["prev"], x["teacher"],
                       alpha_ce=alpha_ce, alpha_l1=alpha_l1, alpha_conf=alpha_conf, gamma=gamma, chunk=chunk)


def grads(draft, hidden, loss):
    params = [p for p in draft.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params + [hidden], allow_unused=True)


CASES = [
    ("vanilla", R, True, True, (0.1, 0.9, 1.0), 4.0),
    ("gated", R, True, True, (0.1, 0.9, 1.0), None),
    ("rnn", R, True, True, (0.3, 0.5, 0.7), 2.0),
    ("vanilla", R, True, False, (0.0, 0.0, 1.0), 4.0),  # the confidence BCE alone, on hidden features only
    ("vanilla", 0, True, False, (1.0, 0.0, 0.0), None),  # rank 0: pure DFlash logits
    ("rnn", R, False, False, (0.1, 0.9, 0.0), 4.0),  # no confidence head
]


@pytest.mark.parametrize("kind,rank,confidence,with_markov,alphas,gamma", CASES)
def test_loss_metrics_and_gradients_match_the_naive_reference(kind, rank, confidence, with_markov, alphas, gamma):
    draft, x = make_draft(kind, rank, confidence, with_markov), make_inputs()
    ref = naive(draft, x, *alphas, gamma)
    out = fast(draft, x, *alphas, gamma)
    tol = dict(rtol=1e-5, atol=1e-5)
    near = dict(rel=1e-5, abs=1e-5)
    assert out.denominator.item() == pytest.approx(ref["den"], **near)
    assert out.numerator.item() == pytest.approx(float(ref["num"]), **near)
    assert out.loss.item() == pytest.approx(float(ref["num"]) / ref["den"], **near)
    s = out.sums
    for key, name in [("ce", "ce_loss"), ("l1", "l1_loss"), ("bce", "confidence_loss"), ("err", "confidence_abs_error"),
                      ("agree", "teacher_agreement"), ("t_top", "teacher_top1_prob"), ("d_top", "draft_top1_prob"),
                      ("tau", "tau")]:
        assert s[name].item() == pytest.approx(ref[key], **near), name
    assert torch.allclose(s["ce_position"], torch.tensor(ref["ce_pos"], dtype=s["ce_position"].dtype), **tol)
    assert out.tokens.item() == ref["tokens"] == 17  # 4 + 2 (hole) + 3 (past the end) + 4 + 4: contiguous prefixes
    assert out.counts.total.tolist() == ref["total"] and out.counts.correct.tolist() == ref["correct"]
    assert int(out.counts.accepted) == ref["accepted"] and int(out.counts.blocks) == ref["blocks"] == 5
    got, want = grads(draft, x["hidden"], out.numerator), grads(draft, x["hidden"], ref["num"])
    for g, r in zip(got, want):
        if r is None:
            assert g is None or not g.abs().any()
        else:
            assert torch.allclose(g, r, **tol)


def test_chunked_objective_equals_unchunked():
    draft, x = make_draft("rnn"), make_inputs()
    a, b = fast(draft, x, 0.1, 0.9, 1.0, 4.0), fast(draft, x, 0.1, 0.9, 1.0, 4.0, chunk=3)
    assert torch.allclose(a.numerator, b.numerator) and torch.equal(a.counts.correct, b.counts.correct)
    for g, r in zip(grads(draft, x["hidden"], a.numerator), grads(draft, x["hidden"], b.numerator)):
        assert (g is None and r is None) or torch.allclose(g, r)


def test_confidence_target_is_detached():
    """The BCE pulls the confidence head toward the acceptance, never the acceptance (the draft's logits) toward it."""
    draft, x = make_draft("vanilla", with_markov=False), make_inputs()
    out = fast(draft, x, 0.0, 0.0, 1.0, None)
    (g_head,) = torch.autograd.grad(out.numerator, [draft.markov_head.markov_w2.weight], allow_unused=True)
    assert g_head is None or not g_head.abs().any()  # W2 only shapes p_D, hence accept: no gradient
    assert torch.autograd.grad(out.numerator, [draft.confidence_head.proj.weight])[0].abs().sum() > 0


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_markov_step_by_step_equals_the_teacher_forced_block(kind):
    """Drafting feeds one token at a time; training feeds the whole block: the same latents for the same tokens."""
    head = make_draft(kind).markov_head
    g = torch.Generator().manual_seed(3)
    prev = torch.randint(0, V, (5, BS), generator=g)
    h = torch.randn(5, BS, H, generator=g, dtype=torch.float64)
    block = head.latents(prev, h)
    state, steps = None, []
    for p in range(BS):
        z, state = head.step(prev[:, p], h[:, p], state)
        steps.append(z)
    assert torch.allclose(block, torch.stack(steps, 1), atol=1e-12)
    if kind != "rnn":  # a non-recurrent head: each slot depends on its own previous token only
        assert torch.allclose(block[:, 1], head.latents(prev[:, 1:2], h[:, 1:2])[:, 0])


def test_metric_pools_sums_before_ratios():
    draft = make_draft("gated")
    outs = [fast(draft, make_inputs(seed), 0.1, 0.9, 1.0, 4.0) for seed in (1, 2)]
    metric = DSparkMetric(BS)
    for o in outs:
        metric.update(o)
    got = metric.compute()
    den = sum(o.denominator for o in outs)
    tokens = sum(o.tokens for o in outs)
    assert got["l1_loss"].item() == pytest.approx(float(sum(o.sums["l1_loss"] for o in outs) / den))
    assert got["teacher_top1_prob"].item() == pytest.approx(float(sum(o.sums["teacher_top1_prob"] for o in outs) / tokens))
    blocks = sum(int(o.counts.blocks) for o in outs)
    assert got["tau_probabilistic"].item() == pytest.approx(float(sum(o.sums["tau"] for o in outs)) / blocks)
    assert 1.0 <= got["tau_probabilistic"].item() <= 1.0 + BS


def test_config_rejects_confidence_on_markov_features_without_a_markov_head():
    plain = make_draft(rank=0, with_markov=False).config.to_dict()
    with pytest.raises(ValueError, match="confidence_head_with_markov"):
        DSparkConfig(**{**plain, "confidence_head_with_markov": True})
    with pytest.raises(ValueError, match="markov_head_type"):
        DSparkConfig(**{**make_draft().config.to_dict(), "markov_head_type": "lstm"})
