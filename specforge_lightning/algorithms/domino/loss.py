"""Domino objective: ``(1-λ)·CE_final + λ·CE_base`` with λ decaying linearly over part of training.

Both CE terms are token-weighted means over the same weights ``w·exp(-p/γ)``
(p = predicted position, i.e. upstream's ``exp(-(j-offset)/γ)``), so the pair
``(numerator, denominator)`` normalises globally exactly like DFlash's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specforge_lightning.algorithms.dflash.loss import (
    BlockCounts,
    block_counts,
    ce_and_argmax,
    position_decay,
    rowwise,
    scatter_rows,
)


def lambda_base(step: int, total_steps: float | None, start: float = 1.0, decay_ratio: float = 0.5) -> float:
    """``clamp(start · (1 - min(step / max(1, int(total·ratio)), 1)), 0, 1)``; 0 without a finite horizon."""
    if total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
        return 0.0
    horizon = max(1, int(total_steps * decay_ratio))
    return min(1.0, max(0.0, start * (1.0 - min(step / horizon, 1.0))))


@dataclass
class DominoLossOutput:
    """Mixed loss and its global-normalisation pair, the two CE numerators, and counts for both heads."""

    loss: torch.Tensor
    numerator: torch.Tensor
    denominator: torch.Tensor
    final_numerator: torch.Tensor
    base_numerator: torch.Tensor
    counts: BlockCounts
    base_counts: BlockCounts
    lambda_base: float


def domino_loss(
    hidden: torch.Tensor,
    gru: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    keep: torch.Tensor,
    logits_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    lam: float,
    gamma: float | None = None,
    prefix_len: int = 1,
    chunk: int = 0,
) -> DominoLossOutput:
    """Loss over predicted positions: ``hidden`` (B,N,P,H), ``gru`` (B,N,P,G), ``labels``/``w`` (B,N,P).

    ``logits_fn(hidden_rows, gru_rows, corrected_rows) -> (base, final)`` logits; positions
    ``p >= prefix_len`` are corrected. Only scored rows reach the head.
    """
    P = w.shape[-1]
    corrected = (torch.arange(P, device=w.device) >= prefix_len).expand_as(w)
    y = labels[w]

    def fn(h: torch.Tensor, g: torch.Tensor, c: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base, final = logits_fn(h, g, c)
        ce_b, pred_b = ce_and_argmax(base, yc)
        ce_f, pred_f = ce_and_argmax(final, yc)
        return ce_f, ce_b, pred_f, pred_b

    ce_f, ce_b, pred_f, pred_b = rowwise(fn, hidden[w], gru[w], corrected[w], y, chunk=chunk)
    weight = (w.float() * position_decay(P, gamma, w.device))[w]
    den = weight.sum()
    num_f, num_b = (ce_f * weight).sum(), (ce_b * weight).sum()
    num = (1.0 - lam) * num_f + lam * num_b
    return DominoLossOutput(
        loss=num / den.clamp_min(1e-12),
        numerator=num,
        denominator=den,
        final_numerator=num_f,
        base_numerator=num_b,
        counts=block_counts(scatter_rows(pred_f == y, w, False), w, keep),
        base_counts=block_counts(scatter_rows(pred_b == y, w, False), w, keep),
        lambda_base=lam,
    )


__all__ = ["DominoLossOutput", "domino_loss", "lambda_base"]
