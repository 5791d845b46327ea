"""Block drafting with a DFlash draft for the speculative-decoding harness.

The harness (``evaluation.speculative``) drives any object with ``start`` /
``propose`` / ``accept`` (its ``Drafter`` protocol); this module does not import
it, so ``algorithms`` stays free of the evaluation side (duck typing).

Alignment, as in training: a block anchored at position ``a`` sees the target's
aux states of positions ``< a`` and the block ``[x_a, MASK, ..., MASK]`` at RoPE
positions ``a..a+bs-1``; slot ``j`` predicts ``x_{a+j}``. At decode time, with
``n`` tokens known, the target has produced aux states for ``x_0..x_{n-2}`` and
``x_{n-1}`` (the last verified token) is the anchor, so ``a = n-1`` and ONE
draft forward proposes ``x_n..x_{n+k-1}`` from slots ``1..k`` (greedy argmax
through the frozen target head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specforge_lightning.algorithms.base import teacher_forced_aux
from specforge_lightning.algorithms.dflash.model import DFlashDraft

BLOCK_DRAFTING = "block (one draft forward proposes up to block_size-1 tokens, top-1), verify k+1 tokens per target forward"
BLOCK_SIMULATED_DEFINITION = (
    "1 + sum_k prod_{j<=k} acc_j, acc_j = teacher-forced CONDITIONAL top-1 accuracy of block slot j: a block is "
    "anchored at every position of the target's greedy output (true aux states before the anchor), acc_j = "
    "fraction of blocks with slots 1..j right that also get slot j+1 right; so this equals the mean over anchors "
    "of 1 + leading correct slots (capped at k), the training metric val/acceptance_length"
)


class BlockDrafter:
    """``Drafter`` for the DFlash family: the verified prefix's aux states are the context, one forward per step.

    State: ``aux`` (n-1, k·H) for the verified tokens ``x_0..x_{n-2}`` and ``last`` = ``x_{n-1}``.
    ``propose(k)`` returns at most ``num_positions`` tokens (block_size-1 for DFlash).
    """

    description = BLOCK_DRAFTING
    simulated_definition = BLOCK_SIMULATED_DEFINITION

    def __init__(self, draft: DFlashDraft) -> None:
        self.draft = draft.eval()
        self.device = draft.fc.weight.device
        self.shift = 1 if getattr(draft.config, "shift_label", False) else 0
        self.num_positions = draft.config.block_size - 1 + self.shift
        self.aux: torch.Tensor | None = None
        self.last: int | None = None

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """Target layers whose outputs form the context (what the ``TargetRunner`` must capture)."""
        return self.draft.config.target_layer_ids

    # ------------------------------------------------------------------ the Drafter protocol

    def start(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        """``aux`` (T, k·H) of ``x_0..x_{T-1}``; ``next_ids`` = ``x_1..x_T`` (the last one is the anchor)."""
        self.aux = aux.to(self.device)
        self.last = int(next_ids[-1])

    def accept(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        """Append the aux states of the verified verify-pass inputs; the last new token is the next anchor."""
        self.aux = torch.cat([self.aux, aux.to(self.device)], dim=0)
        self.last = int(next_ids[-1])

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        k = min(k, self.num_positions)
        if k <= 0:
            return []
        hidden = self.block_hidden(self.aux, self.last)
        return self.decode(hidden, self.last, k)

    # ------------------------------------------------------------------ pieces

    def block_hidden(self, aux: torch.Tensor, anchor_token: int) -> torch.Tensor:
        """Pre-norm hidden (bs, H) of the block ``[anchor_token, MASK, ...]`` anchored right after ``aux``."""
        c = self.draft.config
        S = aux.shape[0]
        block = torch.full((1, 1, c.block_size), c.mask_token_id, dtype=torch.long, device=self.device)
        block[..., 0] = anchor_token
        anchors = torch.full((1, 1), S, dtype=torch.long, device=self.device)
        keep = torch.ones(1, 1, dtype=torch.bool, device=self.device)
        ids = torch.zeros(1, S, dtype=torch.long, device=self.device)  # only its shape is read when block_ids is given
        return self.draft(ids, aux[None], anchors, keep, block_ids=block)[0, 0]

    def decode(self, hidden: torch.Tensor, anchor_token: int, k: int) -> list[int]:
        """Greedy tokens of predicted positions ``0..k-1`` (slots ``1..k``)."""
        slots = hidden[1 - self.shift : 1 - self.shift + k]
        return self.draft.logits(slots).argmax(-1).tolist()

    def teacher_forced_predictions(self, hidden: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
        """Greedy predictions (N, k) of blocks (N, bs, H) anchored at ``anchors`` (N,) of ``ids`` (L,)."""
        slots = hidden[:, 1 - self.shift : 1 - self.shift + k]
        return self.draft.logits(slots).argmax(-1)

    @torch.no_grad()
    def teacher_forced_hits(
        self, runner: Any, prompt_ids: Sequence[int], output_ids: Sequence[int], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hit``, ``valid`` (N, min(k, num_positions)) bool for blocks anchored at ``a = len(prompt) + i``.

        ``runner`` is a ``TargetRunner`` capturing ``layer_ids``. Each block sees the target's
        true aux states before its anchor (what the harness anchors on after a fully verified
        prefix); position j predicts ``x_{a+1+j}``, which must lie inside prompt + output.
        """
        kk = max(0, min(k, self.num_positions))
        seq = teacher_forced_aux(runner, prompt_ids, output_ids) if kk > 0 else None
        if seq is None:
            empty = torch.zeros(0, kk, dtype=torch.bool)
            return empty, empty
        ids, aux = seq
        P, L = len(prompt_ids), len(ids)
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        anchors = torch.arange(P, L - 1, device=self.device)
        keep = torch.ones(1, len(anchors), dtype=torch.bool, device=self.device)
        hidden = self.draft(x[None], aux[None].to(self.device), anchors[None], keep)[0]  # (N, bs, H)
        pred = self.teacher_forced_predictions(hidden, x, anchors, kk)
        pos = anchors[:, None] + 1 + torch.arange(kk, device=self.device)  # (N, kk)
        valid = pos < L
        hit = (pred == x[pos.clamp(max=L - 1)]) & valid
        return hit.cpu(), valid.cpu()

    def teacher_forced_counts(
        self, runner: Any, prompt_ids: Sequence[int], output_ids: Sequence[int], k: int
    ) -> tuple[list[int], list[int]]:
        """Conditional per-position (correct, total), k entries (see ``BLOCK_SIMULATED_DEFINITION``).

        Position j counts the blocks whose positions ``0..j-1`` were all right (and j is inside
        the text); ``correct`` those that also get j right. Positions past the block count 0/0.
        """
        hit, valid = self.teacher_forced_hits(runner, prompt_ids, output_ids, k)
        correct, total = [0] * k, [0] * k
        before = torch.cumprod(torch.cat([torch.ones_like(hit[:, :1]), hit[:, :-1]], 1).long(), 1).bool()
        for j in range(hit.shape[1]):
            total[j] = int((valid[:, j] & before[:, j]).sum())
            correct[j] = int((hit[:, j] & before[:, j]).sum())
        return correct, total


__all__ = ["BLOCK_DRAFTING", "BLOCK_SIMULATED_DEFINITION", "BlockDrafter"]
