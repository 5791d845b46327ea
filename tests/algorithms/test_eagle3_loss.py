"""EAGLE3 loss, gradients and counts against a deliberately naive reference.

The reference loops over samples, TTT steps, positions and heads, builds the
full attention mask over every step's keys explicitly and softmaxes by hand.
It shares only the parameter tensors with the implementation under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from specforge_lightning.algorithms.eagle3.loss import (
    compute_teacher,
    eagle3_loss,
    effective_loss_mask,
    later_scored_rows,
)
from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft, shift_left

B, S, H, V, VD = 2, 10, 32, 50, 20


def tiny_config(**kw) -> Eagle3Config:
    base = dict(
        hidden_size=H,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=128,
        vocab_size=V,
        draft_vocab_size=VD,
        target_hidden_size=H,
        aux_layer_ids=(0, 1, 2),
        initializer_range=0.2,
    )
    base.update(kw)
    return Eagle3Config(**base)


def make_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(tiny_config())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # norms away from 1
        draft.embed_tokens.weight.copy_(torch.randn(V, H, generator=g))
        used = torch.randperm(V, generator=g)[:VD].sort().values
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[used] = True
        draft.set_vocab_mapping(used - torch.arange(VD), t2d)
    head = torch.randn(V, H, generator=g)
    lengths = [S, 7]
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        attention_mask[b, :n] = 1
    batch = {
        "input_ids": torch.randint(0, V, (B, S), generator=g) * attention_mask,
        "loss_mask": torch.ones(B, S, dtype=torch.long) * attention_mask,
        "attention_mask": attention_mask,
        "aux_hidden_states": torch.randn(B, S, 3 * H, generator=g) * attention_mask[..., None],
        "last_hidden_state": torch.randn(B, S, H, generator=g) * attention_mask[..., None],
    }
    batch["loss_mask"][0, :4] = 0  # an unsupervised prompt prefix
    return draft, head, batch


# --------------------------------------------------------------------------- naive reference


def naive_rms(x, w, eps=1e-6):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def naive_rope(x, pos, theta, d):
    """x: (d,) one head at integer position pos; rotate the pairs (i, i + d/2)."""
    half = d // 2
    first, second = [], []
    for i in range(half):
        ang = pos * theta ** (-2.0 * i / d)
        c, s = math.cos(ang), math.sin(ang)
        first.append(x[i] * c - x[i + half] * s)
        second.append(x[i + half] * c + x[i] * s)
    return torch.stack(first + second)


def naive_rope_rows(x, positions, theta, d):
    return torch.stack([naive_rope(x[t].clone(), positions[t], theta, d) for t in range(x.shape[0])])


def naive_draft(draft: Eagle3Draft, ids, aux, attn, K):
    """Per-sample TTT unroll; returns logits[k] as (B, S, Vd)."""
    c = draft.config
    P = dict(draft.named_parameters())
    E = draft.embed_tokens.weight
    nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    per_step = [[] for _ in range(K)]
    for b in range(B):
        hidden = aux[b] @ P["fc.weight"].T
        keys, vals = [], []
        for k in range(K):
            ids_k = torch.tensor([int(ids[b, t + 1 + k]) if t + 1 + k < S else 0 for t in range(S)])
            emb = E[ids_k]
            x_emb = naive_rms(emb, P["midlayer.input_layernorm.weight"])
            x = torch.cat([x_emb, naive_rms(hidden, P["midlayer.hidden_norm.weight"])], -1)
            q = (x @ P["midlayer.self_attn.q_proj.weight"].T).view(S, nh, d)
            kk = (x @ P["midlayer.self_attn.k_proj.weight"].T).view(S, nkv, d)
            vv = (x @ P["midlayer.self_attn.v_proj.weight"].T).view(S, nkv, d)
            pos = [t + k for t in range(S)]
            q = torch.stack([naive_rope_rows(q[:, h], pos, c.rope_theta, d) for h in range(nh)], 1)
            kk = torch.stack([naive_rope_rows(kk[:, h], pos, c.rope_theta, d) for h in range(nkv)], 1)
            keys.append(kk)
            vals.append(vv)
            all_k, all_v = torch.cat(keys, 0), torch.cat(vals, 0)  # ((k+1)·S, nkv, d)
            mask = torch.zeros(S, (k + 1) * S, dtype=torch.bool)
            for t in range(S):
                for s in range(S):
                    mask[t, s] = s <= t and bool(attn[b, s])
                for j in range(1, k + 1):
                    mask[t, j * S + t] = True
            heads = []
            for h in range(nh):
                kv = h // (nh // nkv)
                rows = []
                for t in range(S):
                    sc = torch.stack([q[t, h] @ all_k[j, kv] for j in range(all_k.shape[0])]) / math.sqrt(d)
                    sc = torch.where(mask[t], sc, torch.full_like(sc, -1e30))
                    e = torch.exp(sc - sc.max()) * mask[t]
                    p = e / e.sum()
                    rows.append((p[:, None] * all_v[:, kv]).sum(0))
                heads.append(torch.stack(rows))
            attn_out = torch.cat(heads, -1) @ P["midlayer.self_attn.o_proj.weight"].T
            h1 = hidden + attn_out
            m = naive_rms(h1, P["midlayer.post_attention_layernorm.weight"])
            gate = m @ P["midlayer.mlp.gate_proj.weight"].T
            up = m @ P["midlayer.mlp.up_proj.weight"].T
            out = h1 + (gate * torch.sigmoid(gate) * up) @ P["midlayer.mlp.down_proj.weight"].T
            per_step[k].append(naive_rms(out, P["norm.weight"]) @ P["lm_head.weight"].T)
            hidden = out
    return [torch.stack(x) for x in per_step]


def naive_loss(step_logits, head, batch, t2d, d2t, decay=0.8, normalize="positions"):
    ids_draft = torch.nonzero(t2d).flatten()
    attn, lmask, last = batch["attention_mask"], batch["loss_mask"], batch["last_hidden_state"]
    tgt = torch.zeros(B, S, dtype=torch.long)
    tp = torch.zeros(B, S, len(ids_draft))
    lm = torch.zeros(B, S)
    for b in range(B):
        for t in range(S):
            if t + 1 >= S:
                continue
            logits = head @ last[b, t + 1]
            tgt[b, t] = int(torch.argmax(logits))
            z = logits[ids_draft]
            tp[b, t] = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
            lm[b, t] = float(lmask[b, t] and attn[b, t] and attn[b, t + 1])
    pm = lm * t2d[tgt].float()
    total_loss, plosses, correct, total = 0.0, [], [], []
    for k, logits in enumerate(step_logits):
        acc, n_ok, n_all, cnt = 0.0, 0, 0, 0.0
        for b in range(B):
            for t in range(S - k):
                ls = logits[b, t] - torch.logsumexp(logits[b, t], 0)
                acc = acc + pm[b, t + k] * (tp[b, t + k] * ls).sum()
                cnt += float(pm[b, t + k])
                pred = int(torch.argmax(logits[b, t]))
                if lm[b, t + k]:
                    n_all += 1
                    n_ok += int(pred + int(d2t[pred]) == int(tgt[b, t + k]))
        ploss = -acc / (B * S if normalize == "positions" else max(cnt, 1.0))
        plosses.append(ploss)
        total_loss = total_loss + decay**k * ploss
        correct.append(n_ok)
        total.append(n_all)
    return total_loss, torch.stack(plosses), correct, total, tgt, lm


# --------------------------------------------------------------------------- tests


def fast_loss(draft, head, batch, K, normalize="positions", sparse=False):
    """``sparse``: the production path, logits only at scored rows (hidden states + head)."""
    mask = effective_loss_mask(batch["loss_mask"], batch["attention_mask"])
    teacher = compute_teacher(batch["last_hidden_state"], head, draft.t2d, mask)
    steps = draft.ttt_forward(
        batch["input_ids"], batch["aux_hidden_states"], batch["attention_mask"], K, with_logits=not sparse,
        later_rows=later_scored_rows(mask, K) if sparse else None,
    )
    if sparse:
        hidden = [h for _, h in steps]
        return eagle3_loss(hidden, teacher, draft.d2t, normalize=normalize, head=draft.compute_logits), teacher
    return eagle3_loss([lg for lg, _ in steps], teacher, draft.d2t, normalize=normalize), teacher


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("K", [3, 7])
def test_loss_and_grads_match_naive_reference(K, sparse):
    draft, head, batch = make_case(seed=K)
    grads = {}
    naive = naive_draft(draft, batch["input_ids"], batch["aux_hidden_states"], batch["attention_mask"], K)
    ref_loss, ref_ploss, ref_correct, ref_total, tgt, lm = naive_loss(naive, head, batch, draft.t2d, draft.d2t)
    ref_loss.backward()
    for n, p in draft.named_parameters():
        grads[n] = p.grad.clone()
        p.grad = None

    if sparse:  # the later TTT steps really skip rows here
        assert not later_scored_rows(effective_loss_mask(batch["loss_mask"], batch["attention_mask"]), K).all()
    out, teacher = fast_loss(draft, head, batch, K, sparse=sparse)
    out.loss.backward()
    # The case really exercises out-of-draft-vocab teachers and masked positions.
    in_vocab = draft.t2d[tgt][lm.bool()]
    assert in_vocab.any() and (~in_vocab).any()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ploss, ref_ploss, atol=1e-5, rtol=1e-5)
    assert out.correct.tolist() == ref_correct and out.total.tolist() == ref_total
    assert torch.equal(teacher.target_ids * teacher.loss_mask, tgt * lm.long())
    for n, p in draft.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
        assert grads[n].abs().sum() > 0, n


def test_token_normalisation_matches_naive():
    draft, head, batch = make_case(seed=11)
    with torch.no_grad():
        naive = naive_draft(draft, batch["input_ids"], batch["aux_hidden_states"], batch["attention_mask"], 3)
        ref = naive_loss(naive, head, batch, draft.t2d, draft.d2t, normalize="tokens")
        out, _ = fast_loss(draft, head, batch, 3, normalize="tokens")
    torch.testing.assert_close(out.ploss, ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref[0], atol=1e-5, rtol=1e-5)


def test_effective_mask_drops_last_and_before_padding():
    loss_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    got = effective_loss_mask(loss_mask, attn)
    assert got.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert effective_loss_mask(torch.ones(1, 4, dtype=torch.long)).tolist() == [[1, 1, 1, 0]]


def test_padding_content_never_reaches_the_loss():
    draft, head, batch = make_case(seed=3)
    out, _ = fast_loss(draft, head, batch, 4)
    pad = batch["attention_mask"] == 0
    garbage = {k: v.clone() for k, v in batch.items()}
    garbage["input_ids"][pad] = 7
    garbage["loss_mask"][pad] = 1  # even a (wrong) loss-mask bit on padding is ignored
    garbage["aux_hidden_states"][pad] = 5.0
    garbage["last_hidden_state"][pad] = -3.0
    out2, _ = fast_loss(draft, head, garbage, 4)
    torch.testing.assert_close(out.loss, out2.loss, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.correct, out2.correct) and torch.equal(out.total, out2.total)


def test_counts_and_misses_outside_draft_vocab():
    """Exact counts on constructed logits: hits, misses, and a teacher outside the draft vocab."""
    t2d = torch.tensor([False, True, True, False, True, False])  # draft ids 0,1,2 -> target 1,2,4
    d2t = torch.nonzero(t2d).flatten() - torch.arange(3)
    head = torch.eye(6)
    # Row t+1 of last_hidden decides the teacher at t: targets 2, 4, 3(outside), 1, _.
    last = torch.zeros(1, 6, 6)
    for t, tok in enumerate([2, 4, 3, 1, 2], start=1):
        last[0, t, tok] = 10.0
    mask = effective_loss_mask(torch.ones(1, 6, dtype=torch.long))
    teacher = compute_teacher(last, head, t2d, mask)
    assert teacher.target_ids[0, :5].tolist() == [2, 4, 3, 1, 2]
    assert teacher.position_mask[0].tolist() == [1, 1, 0, 1, 1, 0]
    logits0 = torch.full((1, 6, 3), -5.0)
    for t, d in enumerate([1, 0, 2, 0, 0, 0]):  # draft ids -> target 2, 1(miss), 4(miss: teacher 3), 1, 1(miss)
        logits0[0, t, d] = 5.0
    out = eagle3_loss([logits0, logits0], teacher, d2t)
    assert out.total.tolist() == [5, 4]
    assert out.correct[0].item() == 2  # positions 0 and 3
    # step 1 scores logits at t against the teacher at t+1: targets 4,3,1,2 vs preds 2,1,4,1
    assert out.correct[1].item() == 0


def bf16_teacher_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bf16 head (300 tokens, 120 of them in the draft vocab) and bf16 final states (2, 9, 16)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(300, 16, generator=g).bfloat16()
    last = torch.randn(2, 9, 16, generator=g).bfloat16()
    t2d = torch.zeros(300, dtype=torch.bool)
    t2d[torch.randperm(300, generator=g)[:120]] = True
    return head, last, t2d


def test_bf16_teacher_equals_its_fp32_widened_logits():
    """A bf16 head's logits widened to fp32 first give the same argmax and draft-vocab softmax, bit for bit."""
    head, last, t2d = bf16_teacher_case(seed=0)
    mask = effective_loss_mask(torch.ones(2, 9, dtype=torch.long))
    teacher = compute_teacher(last, head, t2d, mask)
    logits = torch.nn.functional.linear(shift_left(last, 1), head).float()  # widened after the bf16 matmul
    rows = mask.bool()
    assert torch.equal(teacher.target_ids[rows], logits.argmax(-1)[rows])
    assert torch.equal(teacher.target_p[rows], logits[..., t2d].softmax(-1)[rows])


def test_captured_target_top1_gives_the_same_teacher_with_the_draft_rows_only():
    """``target_top1`` from the features replaces the full-vocab argmax: same ids, probabilities and mask."""
    head, last, t2d = bf16_teacher_case(seed=1)
    loss_mask = torch.ones(2, 9, dtype=torch.long)
    loss_mask[1, :3] = 0  # a prompt: no teacher read there
    mask = effective_loss_mask(loss_mask)
    full = compute_teacher(last, head, t2d, mask)
    top1 = torch.nn.functional.linear(last, head).argmax(-1)
    top1[1, :3] = -1  # not captured where no supervised position reads it
    fast = compute_teacher(last, head, t2d, mask, target_top1=top1)
    assert torch.equal(fast.target_ids, full.target_ids)
    assert torch.equal(fast.target_p, full.target_p)
    assert torch.equal(fast.position_mask, full.position_mask)
    assert fast.position_mask.sum() < mask.sum()  # some teachers fall outside the draft vocab
    top1[0, 4] = -1  # a supervised position's teacher that was not captured
    with pytest.raises(ValueError, match="target_top1"):
        compute_teacher(last, head, t2d, mask, target_top1=top1)


def test_teacher_keeps_probabilities_at_supervised_positions_only():
    """``probs`` holds one row per supervised position; ``probs_at`` reads them by flat position."""
    head, last, t2d = bf16_teacher_case(seed=2)
    loss_mask = torch.ones(2, 9, dtype=torch.long)
    loss_mask[0, :4] = 0
    mask = effective_loss_mask(loss_mask)
    teacher = compute_teacher(last, head, t2d, mask)
    assert teacher.probs.shape == (int(mask.sum()), int(t2d.sum()))
    flat = mask.reshape(-1).nonzero().squeeze(-1).flip(0)  # any order
    dense = teacher.target_p.reshape(18, -1)
    assert torch.equal(teacher.probs_at(flat), dense[flat])
    assert dense[~mask.reshape(-1).bool()].abs().sum() == 0
