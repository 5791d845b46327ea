"""The drafts' optimiser: AdamW with a per-optimizer-step warmup + cosine, optionally following a time budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from torch import nn


def warmup_cosine(
    step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0, min_progress: float = 0.0
) -> float:
    """LR multiplier: linear warmup ``(step+1)/warmup`` then cosine from 1 to ``min_lr_ratio``.

    ``warmup = int(warmup_ratio * total_steps)`` as upstream; the cosine spans the remaining steps.
    ``min_progress`` (0..1) moves the cosine at least that far along, e.g. the spent share of
    a time budget, so that a run cut by time still ends annealed.
    """
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(min_progress, (step - warmup) / max(1, total_steps - warmup)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_adamw_cosine(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    total_steps: int | float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_ratio: float = 0.015,
    min_lr_ratio: float = 0.0,
    time_progress: Callable[[], float] | None = None,
    fused: bool = False,
) -> dict[str, Any]:
    """AdamW plus a per-optimizer-step warmup/cosine schedule, in Lightning's return format.

    ``time_progress`` (spent share of a time budget, 0..1) makes the cosine follow the larger
    of the step and the time fractions: see ``time_budget_progress``. ``fused`` asks for the
    one-pass kernel (where every trainable tensor is on CPU or CUDA).
    """
    if not math.isfinite(total_steps) or total_steps <= 0:
        raise ValueError(
            f"the LR schedule needs a finite step horizon, got {total_steps}; set trainer.max_steps for streams"
        )
    total = int(total_steps)
    trainable = [p for p in params if p.requires_grad]
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, total, warmup_ratio, min_lr_ratio, time_progress() if time_progress is not None else 0.0
        ),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def time_budget_progress(trainer: L.Trainer) -> Callable[[], float]:
    """The share of ``trainer.max_time`` spent training so far, as a callable for the schedule.

    It reads Lightning's ``Timer``, whose elapsed time is saved in checkpoints, so a resumed
    run continues the same budget. Without ``max_time`` there is no budget to follow.
    """
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is None or timer.time_remaining() is None:
        raise ValueError("anneal_by_time needs a time budget: set trainer.max_time")

    def progress() -> float:
        elapsed = timer.time_elapsed()
        return min(1.0, elapsed / max(1e-9, elapsed + timer.time_remaining()))

    return progress
