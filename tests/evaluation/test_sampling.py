"""Sampled verification is distributed exactly as target-only sampling (chi-square), and a wrong rule is caught."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specforge_lightning.algorithms.base import TreeSpec
from specforge_lightning.algorithms.eagle3.drafter import Eagle3Drafter
from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft
from specforge_lightning.evaluation.runner import TargetRunner
from specforge_lightning.evaluation.sampling import SamplingParams, choose_child, target_probs
from specforge_lightning.evaluation.speculative import speculative_generate

LAYERS = (1, 2, 3)
V = 8  # a tiny vocabulary: every next-token probability is estimated well from a few thousand trials


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def chi_square_bound(cells: int) -> float:
    """The chi-square quantile a correct sampler exceeds with probability 1e-4 (Wilson-Hilferty)."""
    df, z = cells - 1, 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: Sequence[int], probs: torch.Tensor) -> float:
    n = sum(counts)
    keep = probs > 0
    assert all(c == 0 for c, k in zip(counts, keep.tolist()) if not k), "a token of probability 0 was emitted"
    expected = probs[keep] * n
    observed = torch.tensor(counts, dtype=torch.float64)[keep]
    return float(((observed - expected) ** 2 / expected).sum())


def wrong_rule(p, candidates, generator, proposals=None):
    """Accept with p(x) as the right rule does, but on rejection resample from p instead of the residual."""
    for i, tok in enumerate(candidates):
        if float(torch.rand((), generator=generator)) < float(p[tok]):
            return i, tok
    return None, int(torch.multinomial(p, 1, generator=generator))


P = torch.tensor([0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.12, 0.08])


@pytest.mark.parametrize("candidates", [[0], [2, 0, 6], [3, 4]])
def test_multi_candidate_rule_is_exact_for_top_k_drafts(candidates):
    g, counts = torch.Generator().manual_seed(0), [0] * V
    for _ in range(20000):
        counts[choose_child(P, candidates, g)[1]] += 1
    assert chi_square(counts, P) < chi_square_bound(V - 1)
    g, counts = torch.Generator().manual_seed(0), [0] * V
    for _ in range(20000):
        counts[wrong_rule(P, candidates, g)[1]] += 1
    assert chi_square(counts, P) > chi_square_bound(V - 1)


def test_rule_with_sampled_proposals_uses_min_one_p_over_q():
    q = torch.tensor([0.05, 0.40, 0.05, 0.20, 0.10, 0.10, 0.05, 0.05])
    g, counts, wrong = torch.Generator().manual_seed(1), [0] * V, [0] * V
    for _ in range(20000):
        x = int(torch.multinomial(q, 1, generator=g))
        counts[choose_child(P, [x], g, [q])[1]] += 1
        accept = float(torch.rand((), generator=g)) < min(1.0, float(P[x] / q[x]))
        wrong[x if accept else int(torch.multinomial(P, 1, generator=g))] += 1  # p, not the residual max(p - q, 0)
    assert chi_square(counts, P) < chi_square_bound(V - 1)
    assert chi_square(wrong, P) > chi_square_bound(V - 1)


def test_top_p_keeps_the_smallest_nucleus():
    p = target_probs(torch.log(P + 1e-12), SamplingParams(1.0, 0.6))
    assert set(torch.nonzero(p).flatten().tolist()) == {0, 2, 4}
    assert float(p.sum()) == pytest.approx(1.0)


def tiny_vocab_target() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = LlamaForCausalLM(cfg).eval()
    model.lm_head.weight.data *= 8  # context-dependent, far from uniform (yet never a point mass)
    return model


def exact_marginals(target: LlamaForCausalLM, prompt: list[int], sampling: SamplingParams) -> list[torch.Tensor]:
    """Target-only sampling's exact distributions of new tokens 1, 2 and 3, by enumeration."""
    def probs(seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return target_probs(target(torch.tensor([seq])).logits[0, -1], sampling).double()
    p1 = probs(prompt)
    p2, p3 = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    for a in range(V):
        if p1[a] == 0:
            continue
        pa = probs(prompt + [a])
        p2 += p1[a] * pa
        for b in range(V):
            if pa[b] > 0:
                p3 += p1[a] * pa[b] * probs(prompt + [a, b])
    return [p1, p2, p3]


@pytest.mark.parametrize("spec", [None, TreeSpec(2, 2, 4)], ids=["chain", "tree"])
def test_speculative_sampling_matches_target_sampling(spec):
    target = tiny_vocab_target()
    config = Eagle3Config.from_target_config(target.config.to_dict(), V, LAYERS)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        draft = Eagle3Draft(config)
    draft.embed_tokens.weight = target.model.embed_tokens.weight.detach().clone()
    draft.lm_head.weight.data *= 60  # confident (random) drafts: candidates the target often accepts and rejects
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=0)
    prompt = [1, 5, 2, 7]
    exact = exact_marginals(target, prompt, sampling)
    hooked, drafter = TargetRunner(target, LAYERS), Eagle3Drafter(draft.eval())
    for rule, ok in ((choose_child, True), (wrong_rule, False)):
        counts = [[0] * V for _ in range(3)]
        for trial in range(500):
            g = torch.Generator().manual_seed(trial)
            out = speculative_generate(hooked, drafter, prompt, 2, 3, set(), tree=spec, sampling=sampling,
                                       generator=g, rule=rule).output_ids
            for j, tok in enumerate(out):
                counts[j][tok] += 1
        stats = [chi_square(c, p) for c, p in zip(counts[1:], exact[1:])]  # tokens 2, 3 come from verify steps
        bound = chi_square_bound(V)
        if ok:
            assert chi_square(counts[0], exact[0]) < bound and max(stats) < bound, stats
        else:
            assert max(stats) > bound, stats
