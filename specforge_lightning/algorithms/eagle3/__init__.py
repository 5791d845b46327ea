"""EAGLE3: a one-layer draft on the target's captured hidden states, trained with TTT."""

from specforge_lightning.algorithms.eagle3.loss import (
    Eagle3LossOutput,
    Eagle3Teacher,
    compute_teacher,
    eagle3_loss,
    effective_loss_mask,
)
from specforge_lightning.algorithms.eagle3.model import Eagle3Cache, Eagle3Config, Eagle3Draft
from specforge_lightning.algorithms.eagle3.module import Eagle3Module

__all__ = [
    "Eagle3Cache",
    "Eagle3Config",
    "Eagle3Draft",
    "Eagle3LossOutput",
    "Eagle3Module",
    "Eagle3Teacher",
    "compute_teacher",
    "eagle3_loss",
    "effective_loss_mask",
]
