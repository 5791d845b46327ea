"""EAGLE-2 / SGLang tree drafting with an EAGLE3 draft and its KV cache.

Step 0 takes the top-k children of the root (the last verified slot's logits). Each later step
feeds the ``topk`` best nodes of the previous step (by cumulative draft log-probability, the
beam) in ONE draft forward, each attending to the verified prefix, its own fed ancestors and
itself (a tree mask over the draft cache), and adds their top-k children to the pool. The tree
is the best ``num_draft_tokens - 1`` nodes of the pool (SGLang's ``organize_draft_results``);
a child never scores above its parent, so the selection holds every selected node's ancestors.
With ``threshold`` a node whose cumulative probability is below it is neither expanded nor kept
(EAGLE-2's dynamic tree). topk 1 is exactly the chain ``Eagle3Drafter.propose`` drafts.
"""

from __future__ import annotations

import math

import torch

from specforge_lightning.algorithms.base import DraftTree, TreeSpec
from specforge_lightning.algorithms.eagle3.attention import Eagle3Cache, softmax_attend
from specforge_lightning.algorithms.eagle3.model import Eagle3Draft


def tree_step(
    draft: Eagle3Draft,
    ids: torch.Tensor,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    cache: Eagle3Cache,
    allowed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft_step`` for F tree nodes at once: their keys join ``cache``, ``allowed`` (1, F, keys) masks them."""
    hidden = hidden.to(draft.fc.weight.dtype)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = cache.append(k, v)
        return softmax_attend(q, keys, values, allowed)

    cos, sin = draft._rope(positions, hidden.dtype)
    out = draft.midlayer(draft._embed(ids), hidden, cos, sin, attend)
    return draft.compute_logits(out), out


class _Pool:
    """Every drafted node: target-vocab token, parent (-1 root), cumulative log-prob, depth."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self.depth: list[int] = []

    def expand(self, draft: Eagle3Draft, parents: list[int], logits: torch.Tensor, k: int) -> list[int]:
        """Add the top-k children of each parent (logits (F, Vd)); returns the new node ids."""
        logp = logits.float().log_softmax(-1)
        top_lp, top_id = logp.topk(min(k, logp.shape[-1]), dim=-1)
        ids = draft.to_target_ids(top_id).tolist()
        added = []
        for f, parent in enumerate(parents):
            base = 0.0 if parent < 0 else self.scores[parent]
            depth = 1 if parent < 0 else self.depth[parent] + 1
            for j, lp in enumerate(top_lp[f].tolist()):
                added.append(len(self.tokens))
                self.tokens.append(int(ids[f][j]))
                self.parents.append(parent)
                self.scores.append(base + lp)
                self.depth.append(depth)
        return added

    def best(self, nodes: list[int], n: int, floor: float) -> list[int]:
        alive = [i for i in nodes if self.scores[i] >= floor]
        return sorted(alive, key=lambda i: (-self.scores[i], self.depth[i], i))[:n]

    def tree(self, chosen: list[int]) -> DraftTree:
        order = sorted(chosen, key=lambda i: (self.depth[i], -self.scores[i], i))  # parents first
        new = {old: j for j, old in enumerate(order)}
        return DraftTree(
            tokens=[self.tokens[i] for i in order],
            parents=[-1 if self.parents[i] < 0 else new[self.parents[i]] for i in order],
            scores=[self.scores[i] for i in order],
        )


@torch.no_grad()
def build_tree(
    draft: Eagle3Draft, cache: Eagle3Cache, length: int, logits: torch.Tensor, hidden: torch.Tensor, spec: TreeSpec
) -> DraftTree:
    """Draft a tree after ``length`` verified slots (root logits (Vd,), root hidden (1, 1, H)); ``cache`` grows."""
    if spec.num_steps < 1 or spec.max_nodes < 1:
        return DraftTree()
    floor = math.log(spec.threshold) if spec.threshold else -math.inf
    device = hidden.device
    pool = _Pool()
    fed: dict[int, int] = {}  # node -> its key's index in the draft cache
    out_hidden: dict[int, torch.Tensor] = {}
    new = pool.expand(draft, [-1], logits[None], spec.topk)
    for _ in range(1, spec.num_steps):
        frontier = pool.best(new, spec.topk, floor)
        if not frontier:
            break
        start, F = cache.length, len(frontier)
        allowed = torch.zeros(1, F, start + F, dtype=torch.bool, device=device)
        allowed[..., :length] = True
        for r, f in enumerate(frontier):
            a = pool.parents[f]
            while a >= 0:
                allowed[0, r, fed[a]] = True
                a = pool.parents[a]
            allowed[0, r, start + r] = True
        ids = torch.tensor([[pool.tokens[f] for f in frontier]], dtype=torch.long, device=device)
        parent_hidden = [hidden[0] if pool.parents[f] < 0 else out_hidden[pool.parents[f]] for f in frontier]
        positions = torch.tensor([[length + pool.depth[f] - 1 for f in frontier]], device=device)
        step_logits, step_hidden = tree_step(draft, ids, torch.cat(parent_hidden)[None], positions, cache, allowed)
        for r, f in enumerate(frontier):
            fed[f] = start + r
            out_hidden[f] = step_hidden[0, r : r + 1]
        new = pool.expand(draft, frontier, step_logits[0], spec.topk)
    return pool.tree(pool.best(list(range(len(pool.tokens))), spec.max_nodes, floor))


__all__ = ["build_tree", "tree_step"]
