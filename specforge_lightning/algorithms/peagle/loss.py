"""P-EAGLE loss: soft cross-entropy of every scored element against the frozen teacher, on the draft vocabulary.

The teacher is EAGLE3's (``eagle3.loss.compute_teacher``): the target's distribution at
``orig + 1`` renormalised over the draft vocabulary, with positions whose teacher top-1 lies
outside it masked (``position_mask``). The loss is returned as a numerator and a denominator
(the number of elements that carry loss), so that the module can normalise by the count summed
over every rank and micro-batch: a batch of two then trains exactly as two batches of one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.eagle3.loss import Eagle3Teacher
from specforge_lightning.algorithms.peagle.sampling import Elements


@dataclass
class PEagleLossOutput:
    """``numerator`` (Σ position_mask · CE), ``denominator`` (Σ position_mask), per-depth counts (D,) int64."""

    numerator: torch.Tensor
    denominator: torch.Tensor
    correct: torch.Tensor
    total: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """The masked mean over this batch alone."""
        return self.numerator / self.denominator.clamp_min(1.0)


def scored_elements(elements: Elements, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: real elements whose ``orig`` is supervised (its teacher exists)."""
    return elements.valid & loss_mask.gather(1, elements.orig).bool()


def peagle_loss(
    hidden: torch.Tensor,
    elements: Elements,
    teacher: Eagle3Teacher,
    d2t: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    num_depths: int,
) -> PEagleLossOutput:
    """Loss terms and counts from element hiddens (B, N, H); ``head`` maps hidden rows to draft logits.

    ``correct_d`` counts depth-d scored elements whose ``d2t``-mapped argmax equals the teacher's
    full-vocabulary top-1, ``total_d`` all depth-d scored elements (teacher tokens outside the
    draft vocabulary count as misses, as for EAGLE3).
    """
    B, N, H = hidden.shape
    S = teacher.loss_mask.shape[1]
    rows = scored_elements(elements, teacher.loss_mask).reshape(-1).nonzero().squeeze(-1)
    flat = (rows // N) * S + elements.orig.reshape(-1).index_select(0, rows)  # (b, orig) of each scored element
    logits = head(hidden.reshape(B * N, H).index_select(0, rows)).float()
    logp = F.log_softmax(logits, dim=-1)
    pm = teacher.position_mask.reshape(-1).index_select(0, flat)
    ce = -(teacher.probs_at(flat) * logp).sum(-1)
    numerator, denominator = (pm * ce).sum(), pm.sum()
    with torch.no_grad():
        hit = (d2t[logits.argmax(-1)] + logits.argmax(-1)) == teacher.target_ids.reshape(-1).index_select(0, flat)
        depth = elements.depth.reshape(-1).index_select(0, rows)
        correct = torch.bincount(depth, weights=hit.double(), minlength=num_depths)[:num_depths].long()
        total = torch.bincount(depth, minlength=num_depths)[:num_depths].long()
    return PEagleLossOutput(numerator, denominator, correct, total)


__all__ = ["PEagleLossOutput", "peagle_loss", "scored_elements"]
