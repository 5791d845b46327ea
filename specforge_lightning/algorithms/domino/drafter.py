"""Block drafting with a Domino draft: one DFlash forward, then the GRU correction token by token.

Predicted position p reads the DFlash hidden of its slot and a GRU state that has
consumed ``x_a`` and the tokens drafted before p (training teacher-forces the true
ones). Positions ``p >= pure_draft_prefix_len`` add the correction to the base logits.
"""

from __future__ import annotations

import torch

from specforge_lightning.algorithms.dflash.drafter import BlockDrafter
from specforge_lightning.algorithms.domino.model import DominoDraft


class DominoBlockDrafter(BlockDrafter):
    """``BlockDrafter`` whose tokens come from Domino's corrected logits."""

    draft: DominoDraft

    def _final_logits(self, slots: torch.Tensor, gru: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Final logits (..., P, V) of predicted positions ``first..first+P-1`` (``slots`` (..., P, H))."""
        P = slots.shape[-2]
        positions = torch.arange(first, first + P, device=slots.device)
        corrected = (positions >= self.draft.config.pure_draft_prefix_len).expand(slots.shape[:-1])
        _, final = self.draft.base_and_final_logits(slots, gru, corrected)
        return final

    def decode(self, hidden: torch.Tensor, anchor_token: int, k: int) -> list[int]:
        slots = hidden[1 - self.shift : 1 - self.shift + k]
        out: list[int] = []
        prev, state = anchor_token, None
        for p in range(k):  # the GRU must read each drafted token before the next position
            x = torch.tensor([[[prev]]], dtype=torch.long, device=self.device)
            gru, state = self.draft.gru_states(x, state)  # (1, 1, 1, G)
            logits = self._final_logits(slots[p : p + 1], gru[0, 0], first=p)
            prev = int(logits[0].argmax(-1))
            out.append(prev)
        return out

    def teacher_forced_predictions(self, hidden: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
        slots = hidden[:, 1 - self.shift : 1 - self.shift + k]  # (N, k, H)
        prev_pos = (anchors[:, None] + torch.arange(k, device=ids.device)).clamp(max=len(ids) - 1)
        gru, _ = self.draft.gru_states(ids[prev_pos][None])  # true x_a..x_{a+k-1}: (1, N, k, G)
        return self._final_logits(slots, gru[0]).argmax(-1)


__all__ = ["DominoBlockDrafter"]
