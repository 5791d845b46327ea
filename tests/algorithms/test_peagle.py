"""P-EAGLE: loss, counts and gradients against a naive reference; COD and mask invariants; batch 2 == two batch-1 steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.peagle import PEagleConfig, PEagleDraft, PEagleModule
from specforge_lightning.algorithms.peagle.sampling import (
    all_chains,
    cod_sample,
    document_ids,
    pack_elements,
    sample_elements,
    supervised_mask,
)
from specforge_lightning.contracts import TrainBatch

H, V, VD, MASK, DEPTHS = 16, 40, 24, 1, 4


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_config(layers: int = 2) -> PEagleConfig:
    return PEagleConfig(
        hidden_size=H, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128, vocab_size=V,
        draft_vocab_size=VD, target_hidden_size=H, mask_token_id=MASK, aux_layer_ids=(0, 1, 2),
        num_hidden_layers=layers, num_depths=DEPTHS,
    )


def make_module(seed: int = 0) -> PEagleModule:
    torch.manual_seed(seed)
    module = PEagleModule(num_layers=2, num_depths=DEPTHS, down_sample_ratio=0.7, down_sample_ratio_min=0.3)
    draft = PEagleDraft(make_config())
    used = torch.sort(torch.randperm(V)[:VD]).values  # a non-trivial draft vocabulary
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[used] = True
    draft.set_vocab_mapping(used - torch.arange(VD), t2d)
    for p in draft.parameters():  # larger weights than the init, so that every term matters
        p.data.normal_(0, 0.3)
    module.draft, module.draft_config = draft, draft.config
    module.teacher_head = torch.randn(V, H)
    return module


def make_sample(length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(length, generator=g) < 0.7).long()
    mask[:2] = 0
    return {
        "input_ids": torch.randint(0, V, (length,), generator=g), "loss_mask": mask,
        "aux_hidden_states": torch.randn(length, 3 * H, generator=g), "last_hidden_state": torch.randn(length, H, generator=g),
    }


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    S = max(s["input_ids"].shape[0] for s in samples)
    out = {k: torch.stack([F.pad(s[k], (0, 0) * (s[k].dim() - 1) + (0, S - s[k].shape[0])) for s in samples]) for k in samples[0]}
    out["attention_mask"] = torch.stack([(torch.arange(S) < s["input_ids"].shape[0]).long() for s in samples])
    return out


# --------------------------------------------------------------------------- the naive reference


def naive_rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(d // 2):
        angle = pos / theta ** (2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[..., i] = x[..., i] * c - x[..., i + d // 2] * s
        out[..., i + d // 2] = x[..., i + d // 2] * c + x[..., i] * s
    return out


def naive_attention(attn, x: torch.Tensor, pos: list[int], allowed: list[list[int]], c: PEagleConfig) -> torch.Tensor:
    """Loops over queries and heads; each query's softmax runs over its allowed keys only."""
    n, g = x.shape[0], c.num_attention_heads // c.num_key_value_heads
    q = attn.q_proj(x).view(n, c.num_attention_heads, c.head_dim)
    k = attn.k_proj(x).view(n, c.num_key_value_heads, c.head_dim)
    v = attn.v_proj(x).view(n, c.num_key_value_heads, c.head_dim)
    q = torch.stack([naive_rope(q[i], pos[i], c.rope_theta) for i in range(n)])
    k = torch.stack([naive_rope(k[i], pos[i], c.rope_theta) for i in range(n)])
    rows = []
    for i in range(n):
        heads = []
        for h in range(c.num_attention_heads):
            keys = allowed[i]
            scores = torch.stack([q[i, h] @ k[j, h // g] for j in keys]) / math.sqrt(c.head_dim)
            w = torch.softmax(scores, 0)
            heads.append(sum(w[t] * v[j, h // g] for t, j in enumerate(keys)))
        rows.append(torch.cat(heads))
    return attn.o_proj(torch.stack(rows))


def naive_row(draft: PEagleDraft, head: torch.Tensor, s: dict[str, torch.Tensor], anchors: list[int], depths: list[int]):
    """Numerator, denominator and per-depth counts of one unpadded sample, by explicit loops."""
    c = draft.config
    L = s["input_ids"].shape[0]
    ids, lm = s["input_ids"].tolist(), s["loss_mask"].tolist()
    n = len(anchors)
    emb, hid, pos = [], [], []
    for a, d in zip(anchors, depths):
        o = a + d
        token = (ids[o + 1] if o + 1 < L else 0) if d == 0 else c.mask_token_id
        emb.append(draft.embed_tokens.weight[token])
        hid.append(draft.fc(s["aux_hidden_states"][o] if d == 0 else draft.mask_hidden[0, 0]))
        pos.append(o)
    allowed = [[j for j in range(n) if (depths[j] == 0 and anchors[i] >= anchors[j])
                or (anchors[i] == anchors[j] and depths[i] >= depths[j])] for i in range(n)]
    emb, hid = torch.stack(emb), torch.stack(hid)
    first = draft.layers[0]
    x = torch.cat([first.input_layernorm(emb), first.hidden_norm(hid)], -1)
    h = hid + naive_attention(first.self_attn, x, pos, allowed, c)
    h = h + first.mlp(first.post_attention_layernorm(h))
    for layer in draft.layers[1:]:
        h = h + naive_attention(layer.self_attn, layer.input_layernorm(h), pos, allowed, c)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    draft_ids = torch.arange(c.draft_vocab_size) + draft.d2t
    num, den = torch.zeros(()), torch.zeros(())
    correct, total = [0] * c.num_depths, [0] * c.num_depths
    for i, (a, d) in enumerate(zip(anchors, depths)):
        o = a + d
        if not (lm[o] and o + 1 < L):
            continue
        teacher = head @ s["last_hidden_state"][o + 1]
        top1 = int(teacher.argmax())
        p = torch.softmax(teacher[draft_ids], 0)
        logq = torch.log_softmax(draft.compute_logits(h[i]), 0)
        weight = float(draft.t2d[top1])
        num = num + weight * -(p * logq).sum()
        den = den + weight
        correct[d] += int(int(draft_ids[logq.argmax()]) == top1)
        total[d] += 1
    return num, den, correct, total


# --------------------------------------------------------------------------- tests


def test_loss_counts_and_gradients_equal_the_naive_reference():
    module = make_module()
    samples = [make_sample(30, 1), make_sample(19, 2)]
    batch = collate(samples)
    out = module.compute_loss(TrainBatch(["a", "b"], "peagle", batch), step=3)
    (out.numerator / out.denominator).backward()
    grads = {k: p.grad.clone() for k, p in module.draft.named_parameters()}
    module.draft.zero_grad()

    docs = document_ids(batch["attention_mask"])
    supervised = supervised_mask(batch["loss_mask"], docs)
    from specforge_lightning.algorithms.dflash.loss import anchor_seed

    num, den = torch.zeros(()), torch.zeros(())
    correct, total = [0] * DEPTHS, [0] * DEPTHS
    for b, (sid, s) in enumerate(zip("ab", samples)):
        L = s["input_ids"].shape[0]
        a, d = cod_sample(supervised[b, :L], docs[b, :L], DEPTHS, 0.7, 0.3, torch.Generator().manual_seed(anchor_seed(0, 3, sid)))
        n_, d_, c_, t_ = naive_row(module.draft, module.teacher_head, s, a.tolist(), d.tolist())
        num, den = num + n_, den + d_
        correct, total = [x + y for x, y in zip(correct, c_)], [x + y for x, y in zip(total, t_)]
    assert torch.allclose(out.numerator, num, atol=1e-5, rtol=1e-5) and out.denominator == den
    assert out.correct.tolist() == correct and out.total.tolist() == total
    assert total[DEPTHS - 1] > 0  # every depth is exercised
    (num / den).backward()
    for k, p in module.draft.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-5, rtol=1e-4), k


def test_batch_of_two_equals_two_batches_of_one():
    module = make_module(seed=1)
    samples = [make_sample(13, 3), make_sample(6, 4)]
    together = module.compute_loss(TrainBatch(["x", "y"], "peagle", collate(samples)), step=5)
    together.numerator.backward()
    g2 = {k: p.grad.clone() / together.denominator for k, p in module.draft.named_parameters()}
    module.draft.zero_grad()
    dens = 0.0
    for sid, s in zip("xy", samples):
        out = module.compute_loss(TrainBatch([sid], "peagle", collate([s])), step=5)
        out.numerator.backward()  # accumulated, as Lightning accumulates micro-batches
        dens += float(out.denominator)
    assert dens == float(together.denominator)
    for k, p in module.draft.named_parameters():
        assert torch.allclose(g2[k], p.grad / dens, atol=1e-6, rtol=1e-5), k


def test_cod_sampler_invariants():
    g = torch.Generator().manual_seed(0)
    docs = torch.tensor([[0] * 9 + [1] * 12 + [-1] * 3])  # two packed documents, then padding
    loss_mask = (torch.rand(1, 24, generator=g) < 0.8).long()
    supervised = supervised_mask(loss_mask, docs)[0]
    assert supervised[8] == 0 and supervised[20:].sum() == 0  # each document's last token has no teacher
    for seed in range(20):
        a, d = cod_sample(supervised, docs[0], 6, 0.8, 0.2, torch.Generator().manual_seed(seed))
        again = cod_sample(supervised, docs[0], 6, 0.8, 0.2, torch.Generator().manual_seed(seed))
        assert torch.equal(a, again[0]) and torch.equal(d, again[1])  # deterministic per seed
        assert a[d == 0].tolist() == list(range(21))  # depth 0: every real position
        o = a + d
        deep = d > 0
        assert (a >= 0).all() and supervised[o[deep]].all()  # deeper elements are supervised positions ...
        assert (docs[0, a] == docs[0, o]).all()  # ... on a chain inside one document
        for depth in range(2, 6):  # a depth-d chain continues a depth-(d-1) chain
            prev = set(zip(a[d == depth - 1].tolist(), [depth - 1] * 99))
            assert all((x, depth - 1) in prev for x in a[d == depth].tolist())
        n_sup = int(supervised.sum())
        for depth in range(1, 6):
            assert int((d == depth).sum()) <= max(0, int((n_sup - depth) * max(0.8**depth, 0.2)))
    seeds = [11, 12]
    first = sample_elements(supervised[None].repeat(2, 1), docs.repeat(2, 1), seeds, 6, 0.8, 0.2)
    second = sample_elements(supervised[None].repeat(2, 1), docs.repeat(2, 1), seeds, 6, 0.8, 0.2)
    assert torch.equal(first.anchor, second.anchor) and torch.equal(first.depth, second.depth)


def test_attention_mask_follows_the_rule_and_documents():
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    a, d = all_chains(docs[0], 3)
    e = pack_elements([(a, d)], docs)
    n = a.numel()
    doc = docs[0, a]
    for i in range(n):
        for j in range(n):
            want = bool(doc[i] == doc[j]) and (
                (d[j] == 0 and a[i] >= a[j]) or (a[i] == a[j] and d[i] >= d[j])
            )
            assert bool(e.allowed[0, i, j]) == want, (i, j)
    assert (e.position_ids[0] == torch.where(doc == 0, a + d, a + d - 4)).all()  # RoPE restarts per document
    assert ((a + d) < 7).all() and (docs[0, a + d] == doc).all()  # no chain leaves its document or reaches padding


def test_counts_map_draft_ids_through_d2t_and_miss_out_of_vocabulary_teachers():
    """A 'draft' whose logits are the teacher's own draft-vocabulary logits hits exactly where the top-1 is in the vocabulary."""
    from specforge_lightning.algorithms.eagle3.loss import compute_teacher
    from specforge_lightning.algorithms.peagle.loss import peagle_loss

    module = make_module(seed=2)
    batch = collate([make_sample(30, 5), make_sample(22, 6)])
    docs = document_ids(batch["attention_mask"])
    supervised = supervised_mask(batch["loss_mask"], docs)
    elements = sample_elements(supervised, docs, [1, 2], DEPTHS, 0.8, 0.2)
    teacher = compute_teacher(batch["last_hidden_state"], module.teacher_head, module.draft.t2d, supervised)
    nxt = (elements.orig + 1).clamp(max=batch["input_ids"].shape[1] - 1)
    hidden = batch["last_hidden_state"].gather(1, nxt[..., None].expand(-1, -1, H))
    draft_ids = torch.arange(VD) + module.draft.d2t
    out = peagle_loss(hidden, elements, teacher, module.draft.d2t, lambda x: x @ module.teacher_head[draft_ids].T, DEPTHS)
    correct, total = [0] * DEPTHS, [0] * DEPTHS
    for b in range(2):
        for i in range(elements.anchor.shape[1]):
            o, d = int(elements.orig[b, i]), int(elements.depth[b, i])
            if elements.valid[b, i] and supervised[b, o]:
                top1 = int((module.teacher_head @ batch["last_hidden_state"][b, o + 1]).argmax())
                total[d] += 1
                correct[d] += int(bool(module.draft.t2d[top1]))
    assert out.correct.tolist() == correct and out.total.tolist() == total
    assert 0 < sum(correct) < sum(total)
