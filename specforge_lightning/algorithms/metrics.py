"""Acceptance metrics reduced as counts, so they do not depend on batch size or world size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric


def simulated_acceptance_length(acc: Sequence[float]) -> float:
    """``1 + Σ_k Π_{j≤k} acc_j`` for per-step top-1 accuracies ``acc``.

    The leading 1 is the bonus token the target always contributes on a
    verify step, so the number is comparable with SGLang's reported accept
    length (output tokens / verify steps). Upstream SpecForge's
    ``eval/simulated_acc_len`` is the same sum without the 1.
    """
    al, run = 1.0, 1.0
    for a in acc:
        run *= float(a)
        al += run
    return al


class AcceptanceMetric(Metric):
    """Per-TTT-step top-1 acceptance from summed counts ``correct`` (K,) and ``total`` (K,).

    ``update(correct, total)`` adds one batch's counts; states are sum-reduced
    across ranks before ``compute`` forms any ratio. ``compute()`` returns
    ``{"acc_k": (K,) tensor, "acc": pooled accuracy, "acceptance_length": scalar}``
    where the acceptance length is ``simulated_acceptance_length(acc_k)`` (it
    counts the bonus token). With ``dist_sync_on_step=True``, calling the metric
    (``forward``) returns this dict for the step's counts pooled over all ranks.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_steps = num_steps
        self.add_state("correct", default=torch.zeros(num_steps, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_steps, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, total: torch.Tensor) -> None:
        if correct.shape != (self.num_steps,) or total.shape != (self.num_steps,):
            raise ValueError(f"expected counts of shape ({self.num_steps},), got {tuple(correct.shape)}")
        self.correct += correct.detach().long()
        self.total += total.detach().long()

    def compute(self) -> dict[str, torch.Tensor]:
        acc = self.correct.double() / self.total.clamp_min(1).double()
        al = 1.0 + torch.cumprod(acc, dim=0).sum()
        pooled = self.correct.sum().double() / self.total.sum().clamp_min(1).double()
        return {"acc_k": acc, "acc": pooled, "acceptance_length": al}
