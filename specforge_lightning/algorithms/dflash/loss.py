"""DFlash training objective: anchor sampling, block labels, the CE / D-PACE loss and acceptance counts.

Semantics follow the reference notes §4.4:

* an anchor ``a`` is valid when ``loss_mask[a]`` and ``loss_mask[a+1]`` are set
  (two adjacent supervised tokens); up to ``num_anchors`` are drawn per sample
  uniformly without replacement, then sorted;
* slot ``j`` of the block at ``a`` predicts ``input_ids[a + j + shift]``
  (DFlash: ``shift=0`` and slot 0, the anchor itself, is not scored; Domino's
  ``shift_label``: ``shift=1`` and every slot is scored). The scored slots are
  called "predicted positions" p = 0..P-1 here; p=0 is the first drafted token;
* weight ``w = keep · inside · loss_mask[label]``.

Losses come back as a ``(numerator, denominator)`` pair so the caller can
normalise by the *global* denominator (all ranks, all accumulation micro-steps).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("dflash", "dpace", "dpace-cumulative-confidence-only", "dpace-continuation-value-only")


# --------------------------------------------------------------------------- anchors


def anchor_seed(seed: int, step: int, sample_id: str) -> int:
    """A 63-bit seed from (run seed, optimizer step, sample id): the same anchors after a resume, on any world size."""
    digest = hashlib.blake2b(f"{seed}/{step}/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def valid_anchors(loss_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) bool: positions a ≤ S-2 with ``loss_mask[a]`` and ``loss_mask[a+1]`` (and both real tokens)."""
    m = loss_mask.bool()
    if attention_mask is not None:
        m = m & attention_mask.bool()
    valid = torch.zeros_like(m)
    valid[:, :-1] = m[:, :-1] & m[:, 1:]
    return valid


def sample_anchors(
    loss_mask: torch.Tensor, num_anchors: int, seeds: Sequence[int], attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors (B, N) int64, sorted per sample, and ``keep`` (B, N) bool; N = the largest count drawn.

    Sample i draws ``min(num_anchors, #valid)`` valid positions without replacement from
    a CPU generator seeded with ``seeds[i]`` (random keys, argsort). Padded slots hold
    anchor 0 and ``keep`` False. N is at least 1, so shapes never collapse.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    valid = valid_anchors(loss_mask, attention_mask).cpu()
    B, S = valid.shape
    if len(seeds) != B:
        raise ValueError(f"need one seed per sample, got {len(seeds)} for {B}")
    picked = []
    for i in range(B):
        g = torch.Generator().manual_seed(int(seeds[i]))
        keys = torch.rand(S, generator=g)
        keys[~valid[i]] = 2.0  # invalid positions sort last
        count = min(num_anchors, int(valid[i].sum()))
        picked.append(torch.argsort(keys)[:count].sort().values)
    N = max(1, max(len(p) for p in picked))
    anchors = torch.zeros(B, N, dtype=torch.long)
    keep = torch.zeros(B, N, dtype=torch.bool)
    for i, p in enumerate(picked):
        anchors[i, : len(p)] = p
        keep[i, : len(p)] = True
    return anchors.to(loss_mask.device), keep.to(loss_mask.device)


def block_labels(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor,
    block_size: int, shift: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and weights (B, N, P) of the predicted positions.

    Slot j predicts ``input_ids[a + j + shift]``; slots ``j >= 1 - shift`` are the
    predicted positions (P = bs - 1 + shift). ``w`` is True where the label lies
    inside the sequence, is supervised and the block is real.
    """
    if shift not in (0, 1):
        raise ValueError(f"shift must be 0 or 1, got {shift}")
    B, S = input_ids.shape
    first = 1 - shift
    pos = anchors[..., None] + torch.arange(first, block_size, device=anchors.device) + shift  # (B, N, P)
    inside = pos < S
    idx = pos.clamp(max=S - 1).reshape(B, -1)
    labels = input_ids.gather(1, idx).view(pos.shape)
    w = keep[..., None] & inside & loss_mask.gather(1, idx).view(pos.shape).bool()
    return labels, w


def position_decay(num_positions: int, gamma: float | None, device: torch.device | None = None) -> torch.Tensor:
    """``exp(-p/γ)`` for predicted position p (= upstream ``exp(-(j-1)/γ)`` for DFlash slot j); ones if γ is None."""
    p = torch.arange(num_positions, dtype=torch.float32, device=device)
    return torch.ones_like(p) if gamma is None else torch.exp(-p / float(gamma))


# --------------------------------------------------------------------------- per-row objective


def rowwise(fn: Callable[..., tuple[torch.Tensor, ...]], *rows: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, ...]:
    """Apply ``fn`` to row chunks of ``rows`` and concatenate its per-row outputs.

    With ``chunk > 0`` and autograd on, each chunk runs under activation
    checkpointing, so only the inputs are kept: the full-vocab logits of at most
    ``chunk`` rows exist at a time (upstream's ``objective_chunk_blocks``).
    """
    n = rows[0].shape[0]
    if chunk <= 0 or n <= chunk:
        return fn(*rows)
    parts = []
    for start in range(0, n, chunk):
        piece = [r[start : start + chunk] for r in rows]
        if torch.is_grad_enabled():
            parts.append(checkpoint(fn, *piece, use_reentrant=False))
        else:
            parts.append(fn(*piece))
    return tuple(torch.cat(ts) for ts in zip(*parts))


def ce_and_argmax(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE (at least fp32) and the argmax prediction."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)


def scatter_rows(values: torch.Tensor, mask: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
    """Put per-row values back on the (B, N, P) grid where ``mask`` is True."""
    out = torch.full(mask.shape, fill, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


# --------------------------------------------------------------------------- losses


def dpace_weights(ce: torch.Tensor, w: torch.Tensor, alpha: float, kind: str = "dpace") -> torch.Tensor:
    """D-PACE position weights (B, N, P), detached.

    ``q = exp(-CE)`` is the draft's probability of the label, ``s = (1-α)q + α`` (1 on
    invalid slots), ``P_j = Π_{i≤j} s_i``; weight ``Σ_{i≥j} P_i·w_i`` (dpace), ``P_j``
    (cumulative-confidence-only) or ``Σ_{i≥j} P_i·w_i / P_j`` (continuation-value-only).
    """
    with torch.no_grad():
        wf = w.float()
        s = torch.where(w, (1.0 - alpha) * torch.exp(-ce.float()) + alpha, torch.ones_like(wf))
        prefix = torch.cumprod(s, dim=-1)
        suffix = (prefix * wf).flip(-1).cumsum(-1).flip(-1)
        if kind == "dpace":
            return suffix
        if kind == "dpace-cumulative-confidence-only":
            return prefix
        if kind == "dpace-continuation-value-only":
            return suffix / prefix
        raise ValueError(f"unknown D-PACE variant {kind!r}")


def weighted_terms(
    ce: torch.Tensor, w: torch.Tensor, loss_type: str, gamma: float | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(numerator, denominator)`` of one CE grid (B, N, P) (zeros where ``w`` is False).

    dflash: ``Σ CE·w·decay / Σ w·decay``; D-PACE: ``Σ CE·w·weight / batch_size``.
    """
    if loss_type == "dflash":
        weight = w.float() * position_decay(w.shape[-1], gamma, w.device)
        return (ce * weight).sum(), weight.sum()
    if loss_type in LOSS_TYPES:
        weight = dpace_weights(ce, w, alpha, loss_type) * w.float()
        return (ce * weight).sum(), torch.tensor(float(w.shape[0]), device=w.device)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


@dataclass
class BlockCounts:
    """Acceptance counts: per predicted position ``correct``/``total`` (P,), and block-level
    ``accepted`` (Σ over real blocks of leading-correct + 1) over ``blocks``."""

    correct: torch.Tensor
    total: torch.Tensor
    accepted: torch.Tensor
    blocks: torch.Tensor

    @property
    def acceptance_length(self) -> float:
        return float(self.accepted) / max(1, int(self.blocks))


@torch.no_grad()
def block_counts(hit: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> BlockCounts:
    """Counts from a (B, N, P) grid of correct predictions; an unscored slot ends a block's run."""
    hit = hit & w
    lead = torch.cumprod(hit.long(), dim=-1).sum(-1)  # (B, N)
    return BlockCounts(
        correct=hit.long().sum((0, 1)),
        total=w.long().sum((0, 1)),
        accepted=((lead + 1) * keep.long()).sum(),
        blocks=keep.long().sum(),
    )


@dataclass
class DFlashLossOutput:
    """``loss = numerator / denominator`` (this batch alone); the pair is for global normalisation."""

    loss: torch.Tensor
    numerator: torch.Tensor
    denominator: torch.Tensor
    counts: BlockCounts


def dflash_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    keep: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    loss_type: str = "dflash",
    gamma: float | None = None,
    alpha: float = 0.5,
    chunk: int = 0,
) -> DFlashLossOutput:
    """Loss over the predicted positions: ``hidden`` (B, N, P, H), ``labels``/``w`` (B, N, P).

    Logits (``head``: hidden rows → full-vocab logits) are computed only on scored
    rows, in chunks of ``chunk`` rows under checkpointing when ``chunk > 0``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    x = hidden[w]
    y = labels[w]

    def fn(xc: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ce_and_argmax(head(xc), yc)

    ce_rows, pred_rows = rowwise(fn, x, y, chunk=chunk)
    ce = scatter_rows(ce_rows, w, 0.0)
    num, den = weighted_terms(ce, w, loss_type, gamma, alpha)
    hit = scatter_rows(pred_rows == y, w, False)
    return DFlashLossOutput(num / den.clamp_min(1e-12), num, den, block_counts(hit, w, keep))


__all__ = [
    "LOSS_TYPES",
    "BlockCounts",
    "DFlashLossOutput",
    "anchor_seed",
    "block_counts",
    "block_labels",
    "ce_and_argmax",
    "dflash_loss",
    "dpace_weights",
    "position_decay",
    "rowwise",
    "sample_anchors",
    "scatter_rows",
    "valid_anchors",
    "weighted_terms",
]
