"""DSpark objective: ``α_ce·CE + α_l1·L1(p_D, p_T) + α_conf·BCE(conf, accept)`` over a contiguous-prefix mask.

Semantics (reference notes §4.6, upstream ``OnlineDSparkModel``):

* slot j of the block at a predicts ``x[a+1+j]`` (``block_labels(shift=1)``); the eval mask is
  ``cumprod_j(keep ∧ inside ∧ loss_mask[label])``: after the first unsupervised label nothing counts;
* weights ``w = eval_mask · exp(-j/γ)`` (ones without γ);
* ``p_T = softmax(lm_head(last_hidden[a+j]))``: the target state that predicts the label (no grad);
  ``L1 = Σ_v |p_D - p_T|``, ``accept = clamp(1 - L1/2, 0, 1)`` (= Σ_v min(p_D, p_T));
* ``BCE = BCE_with_logits(conf, accept.detach())``;
* the loss is ``Σ (α_ce·CE + α_l1·L1 + α_conf·BCE)·w / Σ w``, returned as a ``(numerator, denominator)``
  pair so the module normalises by the global ``Σ w`` (all ranks, all accumulation steps).

Only rows with ``w > 0`` reach the full-vocab head, in checkpointed chunks as DFlash does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.dflash.loss import BlockCounts, block_counts, position_decay, rowwise, scatter_rows
from specforge_lightning.algorithms.dspark.model import DSparkDraft

# Sums whose ratio to the weight sum Σw are the logged loss components.
WEIGHTED_SUMS = ("ce_loss", "l1_loss", "confidence_loss")
# Sums whose ratio to the scored-token count are the logged per-token means.
TOKEN_SUMS = ("confidence_abs_error", "teacher_agreement", "teacher_top1_prob", "draft_top1_prob")


@dataclass
class DSparkLossOutput:
    """The loss of this batch alone, its global-normalisation pair, and every metric as summed counts.

    ``sums`` holds :data:`WEIGHTED_SUMS` (over ``denominator``), :data:`TOKEN_SUMS` (over
    ``tokens``), ``tau`` (over ``counts.blocks``) and ``ce_position`` (P,) (over ``counts.total``).
    """

    loss: torch.Tensor
    numerator: torch.Tensor
    denominator: torch.Tensor
    tokens: torch.Tensor
    counts: BlockCounts
    sums: dict[str, torch.Tensor]


def eval_mask(w: torch.Tensor) -> torch.Tensor:
    """The contiguous scored prefix of each block: ``cumprod`` of the per-slot validity (B, N, P) bool."""
    return torch.cumprod(w.long(), dim=-1).bool()


def tau_probabilistic(accept: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ over real blocks of ``1 + Σ_j Π_{i≤j} accept_i·mask_i`` (divide by the block count for the mean)."""
    run = torch.cumprod(accept.double() * mask.double(), dim=-1).sum(-1)
    return ((run + 1.0) * keep.double()).sum()


def dspark_loss(
    draft: DSparkDraft,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    keep: torch.Tensor,
    prev_ids: torch.Tensor,
    teacher_hidden: torch.Tensor,
    alpha_ce: float = 0.1,
    alpha_l1: float = 0.9,
    alpha_conf: float = 1.0,
    gamma: float | None = None,
    chunk: int = 0,
) -> DSparkLossOutput:
    """Loss over the block slots: ``hidden`` (B,N,P,H) pre-norm backbone output, ``labels``/``w``/``prev_ids``
    (B,N,P) from ``block_labels(shift=1)``, ``teacher_hidden`` (B,N,P,H) = target ``last_hidden_state[a+j]``."""
    mask = eval_mask(w)
    P = mask.shape[-1]
    weight = mask.float() * position_decay(P, gamma, mask.device)
    normed = draft.norm(hidden)
    z = draft.markov_latents(prev_ids, normed)
    conf = draft.confidence_logits(normed, prev_ids)
    head_w = draft.lm_head.weight

    def fn(h: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *zc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = draft.head_logits(h, zc[0] if zc else None).float()
        with torch.no_grad():
            p_t = F.linear(t.to(head_w.dtype), head_w).float().softmax(-1)
        p_d = logits.softmax(-1)
        ce = F.cross_entropy(logits, y, reduction="none")
        l1 = (p_d - p_t).abs().sum(-1)
        p_top = p_d.detach().max(-1)
        return ce, l1, p_top.indices, p_top.values, p_t.argmax(-1), p_t.max(-1).values

    rows = (normed[mask], teacher_hidden[mask], labels[mask]) + (() if z is None else (z[mask],))
    ce_r, l1_r, pred_r, p_d_top, t_arg, p_t_top = rowwise(fn, *rows, chunk=chunk)
    w_r = weight[mask]
    accept = scatter_rows((1.0 - 0.5 * l1_r.detach()).clamp(0.0, 1.0), mask, 0.0)
    ce_num, l1_num = (ce_r * w_r).sum(), (l1_r * w_r).sum()
    zero = ce_num.new_zeros(())
    conf_num, abs_err = zero, zero.detach()
    if conf is not None:
        c_r, a_r = conf[mask].float(), accept[mask]
        conf_num = (F.binary_cross_entropy_with_logits(c_r, a_r, reduction="none") * w_r).sum()
        abs_err = (torch.sigmoid(c_r.detach()) - a_r).abs().sum()
    num = alpha_ce * ce_num + alpha_l1 * l1_num + alpha_conf * conf_num
    den = weight.sum()
    y = labels[mask]
    sums = {
        "ce_loss": ce_num.detach(),
        "l1_loss": l1_num.detach(),
        "confidence_loss": conf_num.detach(),
        "confidence_abs_error": abs_err,
        "teacher_agreement": (pred_r == t_arg).sum().float(),
        "teacher_top1_prob": p_t_top.sum(),
        "draft_top1_prob": p_d_top.sum(),
        "tau": tau_probabilistic(accept, mask, keep),
        "ce_position": scatter_rows(ce_r.detach(), mask, 0.0).sum((0, 1)),
    }
    counts = block_counts(scatter_rows(pred_r == y, mask, False), mask, keep)
    return DSparkLossOutput(num / den.clamp_min(1e-12), num, den, mask.sum().float(), counts, sums)


__all__ = ["TOKEN_SUMS", "WEIGHTED_SUMS", "DSparkLossOutput", "dspark_loss", "eval_mask", "tau_probabilistic"]
