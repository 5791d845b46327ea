"""Verification of a drafted tree against the target: greedy (exact match) or speculative sampling.

Sampling is the multi-candidate form of speculative sampling (SpecInfer's recursive rejection
sampling, the rule EAGLE and SGLang's ``tree_speculative_sampling_target_only`` apply): at a node
the target's distribution ``p`` (temperature, then top-p) meets the children one by one; child
``x`` drawn from proposal ``q`` is accepted with probability ``min(1, p(x) / q(x))``, and on
rejection ``p`` becomes the normalised residual ``max(p - q, 0)``; when every child is rejected
the emitted token is drawn from the last residual. Top-k drafts are deterministic, so ``q`` is a
point mass: accept with ``p(x)``, and the residual is ``p`` with ``x`` removed. Either way every
emitted token is distributed exactly as target-only sampling would draw it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specforge_lightning.algorithms.base import DraftTree


@dataclass(frozen=True)
class SamplingParams:
    """How the target samples: temperature 0 is greedy (exact, token-identical); ``seed`` seeds each prompt."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """The target's sampling distribution for one row of logits: softmax(logits / T), top-p, on CPU in float32."""
    probs = (logits.detach().float().cpu() / sampling.temperature).softmax(-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p  # the smallest prefix holding top_p mass stays
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        probs = probs / probs.sum()
    return probs


Rule = Callable[[torch.Tensor, Sequence[int], torch.Generator, Sequence[torch.Tensor | None] | None], tuple[int | None, int]]


def choose_child(
    p: torch.Tensor,
    candidates: Sequence[int],
    generator: torch.Generator,
    proposals: Sequence[torch.Tensor | None] | None = None,
) -> tuple[int | None, int]:
    """Recursive rejection sampling over ``candidates`` (distinct tokens): (accepted index or None, emitted token).

    ``proposals[i]`` is the distribution candidate i was drawn from; None (or no list) is a point mass.
    """
    residual = p
    for i, tok in enumerate(candidates):
        q = proposals[i] if proposals is not None else None
        qx = 1.0 if q is None else float(q[tok])
        u = float(torch.rand((), generator=generator))
        if qx > 0 and u < min(1.0, float(residual[tok]) / qx):
            return i, tok
        if q is None:
            nxt = residual.clone()
            nxt[tok] = 0.0
        else:
            nxt = (residual - q).clamp_min(0.0)
        total = float(nxt.sum())
        if total <= 0:  # only when residual == q, whose acceptance probability was 1: rounding
            break
        residual = nxt / total
    return None, int(torch.multinomial(residual, 1, generator=generator))


def children_of(tree: DraftTree) -> list[list[int]]:
    """``out[p + 1]``: the children of node p (p = -1: the root), in tree order."""
    out: list[list[int]] = [[] for _ in range(len(tree.tokens) + 1)]
    for i, p in enumerate(tree.parents):
        out[p + 1].append(i)
    return out


def verify_tree(
    logits: torch.Tensor,
    tree: DraftTree,
    sampling: SamplingParams,
    generator: torch.Generator | None = None,
    rule: Rule = choose_child,
) -> tuple[list[int], int]:
    """Walk the tree from the root: (accepted node indices, in path order; the target's bonus token).

    ``logits`` (N+1, V): row 0 the root's, row i+1 node i's. Greedy: follow the child equal to the
    target's argmax. Sampling: ``rule`` at every node on the path (the accepted child, or the
    residual draw that ends the walk); a leaf's bonus is drawn from ``p`` itself.
    """
    kids = children_of(tree)
    path: list[int] = []
    row = 0
    if sampling.greedy:
        best = logits.argmax(-1).tolist()
        while True:
            nxt = next((c for c in kids[row] if tree.tokens[c] == best[row]), None)
            if nxt is None:
                return path, best[row]
            path.append(nxt)
            row = nxt + 1
    assert generator is not None, "sampled verification needs a seeded generator"
    while True:
        p = target_probs(logits[row], sampling)
        picked, token = rule(p, [tree.tokens[c] for c in kids[row]], generator, None)
        if picked is None:
            return path, token
        path.append(kids[row][picked])
        row = kids[row][picked] + 1


__all__ = ["Rule", "SamplingParams", "children_of", "choose_child", "target_probs", "verify_tree"]
