"""Parallel drafting with a P-EAGLE draft for the speculative-decoding harness (``evaluation.speculative``).

Indexing (the training alignment): depth-0 slot ``t`` holds the target's aux state of ``x_t``
next to ``x_{t+1}`` at RoPE position ``t``. With ``n`` tokens known the verified slots are
``0..n-2``; the last one is the anchor ``a = n-2``, whose depth ``d`` predicts ``x_{n+d}``.
ONE draft forward runs the slots verified since the last proposal plus ``k-1`` MASK slots at
positions ``a+1..a+k-1`` and proposes ``x_n..x_{n+k-1}`` (greedy, through ``d2t``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specforge_lightning.algorithms.base import VerifyingTarget, teacher_forced_aux
from specforge_lightning.algorithms.eagle3.attention import Eagle3Cache
from specforge_lightning.algorithms.peagle.model import PEagleDraft
from specforge_lightning.algorithms.peagle.sampling import all_chains, pack_elements

PARALLEL_DRAFTING = "parallel (one draft forward proposes up to num_depths tokens, top-1), verify k+1 tokens per target forward"
PARALLEL_SIMULATED_DEFINITION = (
    "1 + sum_k prod_{j<=k} acc_j, acc_j = teacher-forced top-1 accuracy of depth j along the target's greedy "
    "output on the same prompts: every anchor the harness can draft from (the verified text up to it, MASK slots "
    "after it) predicting a token inside the output"
)


class PEagleDrafter:
    """``Drafter`` for P-EAGLE: one KV cache per draft layer holding the verified depth-0 slots.

    ``propose(k)`` returns at most ``num_depths`` tokens; ``start``/``accept`` only queue the
    verified slots, which the next ``propose`` runs in the same forward as its MASK slots.
    """

    description = PARALLEL_DRAFTING
    simulated_definition = PARALLEL_SIMULATED_DEFINITION

    def __init__(self, draft: PEagleDraft) -> None:
        c = draft.config
        if len(c.aux_layer_ids) * c.target_hidden_size != draft.fc.in_features:
            raise ValueError(f"draft config has aux_layer_ids {c.aux_layer_ids}; its fc expects {draft.fc.in_features} inputs")
        self.draft = draft.eval()
        self.layer_ids = tuple(c.aux_layer_ids)
        self.num_positions = c.num_depths
        self.device = draft.fc.weight.device
        self.caches: list[Eagle3Cache] = []
        self.length = 0
        self._aux: torch.Tensor | None = None
        self._ids: list[int] = []

    def start(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        self.caches = [Eagle3Cache() for _ in self.draft.layers]
        self.length = 0
        self._aux, self._ids = aux, list(next_ids)

    def accept(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        self._aux, self._ids = aux, list(next_ids)

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        k = min(k, self.num_positions)
        if k <= 0 or self._aux is None:
            return []
        ids = torch.tensor(self._ids, dtype=torch.long, device=self.device)
        T = len(self._ids)
        logits = self.draft.decode(self._aux, ids, self.length, k - 1, self.caches)
        self.length += T
        self._aux, self._ids = None, []
        return self.draft.to_target_ids(logits[T - 1 :].argmax(-1)).tolist()

    @torch.no_grad()
    def teacher_forced_predictions(self, ids: Sequence[int], aux: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """``anchor``, ``depth`` and the greedy target-vocabulary prediction of every chain of ``ids`` up to depth k-1."""
        L = len(ids)
        # k-1 placeholder slots after the text, so that the last anchors' MASK slots have positions;
        # they come after every real anchor and so change none of its chain (causal rule).
        x = torch.tensor([list(ids) + [0] * (k - 1)], dtype=torch.long, device=self.device)
        aux = torch.cat([aux.to(self.device), aux.new_zeros(k - 1, aux.shape[-1]).to(self.device)])
        docs = torch.zeros_like(x)
        elements = pack_elements([all_chains(docs[0], k)], docs)
        hidden = self.draft(x, aux[None], elements)[0]
        pred = self.draft.to_target_ids(self.draft.compute_logits(hidden).argmax(-1))
        real = elements.anchor[0] < L
        return elements.anchor[0][real], elements.depth[0][real], pred[real]

    @torch.no_grad()
    def teacher_forced_counts(
        self, runner: VerifyingTarget, prompt_ids: Sequence[int], output_ids: Sequence[int], k: int
    ) -> tuple[list[int], list[int]]:
        """Per-depth (correct, total): anchors ``a >= len(prompt) - 1`` (where the harness drafts), targets inside the text."""
        correct, total = [0] * k, [0] * k
        kk = min(k, self.num_positions)
        seq = teacher_forced_aux(runner, prompt_ids, output_ids) if kk > 0 else None
        if seq is None:
            return correct, total
        ids, aux = seq
        P, L = len(prompt_ids), len(ids)
        anchor, depth, pred = self.teacher_forced_predictions(ids, aux, kk)
        target = anchor + depth + 2
        keep = (anchor >= P - 1) & (target < L)
        truth = torch.tensor(ids, device=self.device)[target.clamp(max=L - 1)]
        for d in range(kk):
            at = keep & (depth == d)
            correct[d] = int((pred[at] == truth[at]).sum())
            total[d] = int(at.sum())
        return correct, total


__all__ = ["PARALLEL_DRAFTING", "PARALLEL_SIMULATED_DEFINITION", "PEagleDrafter"]
