"""EAGLE3 teacher and loss (upstream semantics, see the reference notes §4.2).

Alignment: at position t the draft reads aux feature f_t and token x_{t+1}; its
teacher is the target's distribution at position t+1 (predicting x_{t+2}).
TTT step k is scored at position t against the teacher at t+k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.eagle3.model import shift_left

Normalize = Literal["positions", "tokens"]


@dataclass
class Eagle3Teacher:
    """Per-position teacher quantities, already shifted so that row t holds the target at t+1.

    The draft-vocabulary distributions are kept only at the supervised positions
    (``probs``, one row per set bit of ``loss_mask``, in row-major order): the loss reads
    them there, and a dense (B, S, Vd) copy would cost a write and a shifted copy per
    TTT step for nothing.
    """

    target_ids: torch.Tensor  # (B, S) int64, argmax over the full target vocab (0 where unsupervised)
    probs: torch.Tensor  # (N, Vd) fp32, softmax renormalised over the draft vocab at the N supervised positions
    position_mask: torch.Tensor  # (B, S) fp32, t2d[target_ids] * loss_mask
    loss_mask: torch.Tensor  # (B, S) int64, the effective loss mask (see effective_loss_mask)

    def probs_at(self, flat: torch.Tensor) -> torch.Tensor:
        """Teacher distributions at flat positions ``b * S + t``, all of them supervised: (len(flat), Vd)."""
        slot = torch.cumsum(self.loss_mask.reshape(-1), 0) - 1  # row of ``probs`` for each supervised position
        return self.probs.index_select(0, slot.index_select(0, flat))

    @property
    def target_p(self) -> torch.Tensor:
        """(B, S, Vd) dense view: the distribution at supervised positions, 0 elsewhere."""
        B, S = self.loss_mask.shape
        dense = self.probs.new_zeros(B * S, self.probs.shape[-1])
        dense[self.loss_mask.reshape(-1).nonzero().squeeze(-1)] = self.probs
        return dense.view(B, S, -1)


@dataclass
class Eagle3LossOutput:
    """Total loss, per-step ploss (K,), and per-step acceptance counts correct/total (K,) int64."""

    loss: torch.Tensor
    ploss: torch.Tensor
    correct: torch.Tensor
    total: torch.Tensor

    @property
    def acc(self) -> torch.Tensor:
        return self.correct.double() / self.total.clamp_min(1).double()


def effective_loss_mask(loss_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Drop positions whose teacher lies beyond the sequence.

    A position is supervised only if it is a real token, its loss-mask bit is set
    and the *next* position is a real token too; the last column is always dropped
    (upstream forces ``loss_mask[-1] = 0`` per sample before padding).
    """
    mask = loss_mask.long()
    if attention_mask is not None:
        mask = mask * attention_mask.long() * shift_left(attention_mask.long(), 1)
    else:
        mask = mask.clone()
    mask[:, -1] = 0
    return mask


def later_scored_rows(loss_mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B,S) bool: positions t that some TTT step k >= 1 scores, i.e. loss_mask[t + k] for a k in 1..length-1."""
    rows = torch.zeros_like(loss_mask, dtype=torch.bool)
    for k in range(1, length):
        rows |= shift_left(loss_mask, k).bool()
    return rows


@torch.no_grad()
def compute_teacher(
    last_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    t2d: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int | None = None,
    target_top1: torch.Tensor | None = None,
) -> Eagle3Teacher:
    """Teacher from the target's final post-norm hidden (B,S,H) and its frozen head (V,H).

    ``loss_mask`` should be the effective mask. The logits are computed in the
    head's dtype (fp32 stays exact; a bf16 head accumulates in fp32 as upstream)
    with autocast off; the argmax reads those logits (widening them to fp32 would not
    change it) and the softmax runs in fp32. ``chunk_size`` bounds the
    rows whose full-vocab logits exist at once.

    ``target_top1`` (B,S), the target's greedy token at each position as captured with
    the features, replaces the full-vocabulary argmax: then only the draft-vocabulary
    rows of the head run (a sixth of the work on SmolLM2 with 8,192 draft tokens).
    """
    B, S, H = last_hidden.shape
    # Only supervised positions need a teacher: prompts and padding are skipped.
    rows = loss_mask.reshape(-1).nonzero().squeeze(-1)
    hidden = shift_left(last_hidden, 1).reshape(B * S, H).index_select(0, rows)
    draft_rows = torch.nonzero(t2d.to(head_weight.device)).flatten()
    ids, probs = [], []
    with torch.autocast(device_type=last_hidden.device.type, enabled=False):
        # A captured top-1 spares the full-vocabulary rows: only the draft rows are needed then.
        head = head_weight if target_top1 is None else head_weight.index_select(0, draft_rows)
        for chunk in hidden.split(chunk_size or max(1, hidden.shape[0])):
            logits = F.linear(chunk.to(head_weight.dtype), head)
            if target_top1 is None:
                # A bf16 head's logits are rounded to bf16 already: the argmax needs no fp32 copy of
                # the full vocab, only the draft columns are widened for the softmax.
                ids.append(logits.argmax(-1))
                logits = logits.index_select(-1, draft_rows)
            probs.append(logits.float().softmax(-1))
    if target_top1 is not None:
        ids = [shift_left(target_top1.long(), 1).reshape(-1).index_select(0, rows)]
        if (ids[0] < 0).any():
            raise ValueError("target_top1 is -1 (not captured) at a supervised position's teacher")
    target_ids = torch.zeros(B * S, dtype=torch.long, device=last_hidden.device)
    if rows.numel():
        target_ids[rows] = torch.cat(ids)
        probs = torch.cat(probs)
    else:
        probs = torch.zeros(0, len(draft_rows), dtype=torch.float32, device=last_hidden.device)
    target_ids = target_ids.view(B, S)
    position_mask = t2d[target_ids].float() * loss_mask.float()
    return Eagle3Teacher(target_ids, probs, position_mask, loss_mask.long())


def eagle3_loss(
    step_outputs: Sequence[torch.Tensor],
    teacher: Eagle3Teacher,
    d2t: torch.Tensor,
    decay: float = 0.8,
    normalize: Normalize = "positions",
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Eagle3LossOutput:
    """``L = Σ_k decay^k · ploss_k`` with ``ploss_k = -Σ_t m_{t+k} Σ_v p_{t+k,v} log q_{k,t,v} / N``.

    ``step_outputs`` are per-step logits (B,S,Vd), or per-step hidden states
    (B,S,H) when ``head`` maps hidden rows to logits: then logits are computed
    only at the positions step k scores, which skips prompts and padding (the
    bulk of the lm_head and softmax work) and gives the same loss.
    ``normalize="positions"`` (upstream): N = B·S, every padded position counted.
    ``normalize="tokens"``: N = the number of positions step k supervises
    (Σ position_mask, at least 1), a per-token mean that does not depend on padding.
    Counts: ``correct_k = Σ 1[d2t(argmax logits_k) == target_ids] · loss_mask`` and
    ``total_k = Σ loss_mask`` at the k-shifted positions, so teacher tokens outside
    the draft vocab count as misses.
    """
    if normalize not in ("positions", "tokens"):
        raise ValueError(f"normalize must be 'positions' or 'tokens', got {normalize!r}")
    B, S = teacher.target_ids.shape
    plosses, correct, total = [], [], []
    for k, out in enumerate(step_outputs):
        n = S - k
        lm = teacher.loss_mask[:, k:]
        # Rows step k scores: a superset of position_mask (out-of-vocab teachers still count as misses).
        rows = lm.reshape(-1).nonzero().squeeze(-1)
        x = out[:, :n].reshape(B * n, -1).index_select(0, rows)
        logits = (head(x) if head is not None else x).float()  # fp32: exact for bf16, and argmax is 4x faster
        logp = F.log_softmax(logits, dim=-1)
        pm = teacher.position_mask[:, k:].reshape(-1).index_select(0, rows)
        p = teacher.probs_at(rows // n * S + rows % n + k)  # row (b, t) of the shifted view is (b, t + k)
        nll = -(pm * (p * logp).sum(-1)).sum()
        denom = B * S if normalize == "positions" else pm.sum().clamp_min(1.0)
        plosses.append(nll / denom)
        with torch.no_grad():
            pred = logits.argmax(-1)
            want = teacher.target_ids[:, k:].reshape(-1).index_select(0, rows)
            correct.append((pred + d2t[pred] == want).long().sum())
            total.append(lm.sum())
    ploss = torch.stack(plosses)
    weights = decay ** torch.arange(len(plosses), dtype=ploss.dtype, device=ploss.device)
    return Eagle3LossOutput(
        loss=(weights * ploss).sum(), ploss=ploss, correct=torch.stack(correct), total=torch.stack(total)
    )
