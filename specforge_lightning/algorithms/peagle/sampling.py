"""P-EAGLE's element layout: which (anchor, depth) pairs a forward computes, and what each may attend to.

An *element* is one query of the parallel draft: depth 0 at position ``a`` reads the target's
aux state of ``x_a`` and the token ``x_{a+1}`` (the EAGLE3 alignment) and predicts ``x_{a+2}``;
depth ``d >= 1`` of the same anchor reads the MASK token and the learned ``mask_hidden`` at
RoPE position ``a + d`` and predicts ``x_{a+d+2}``. Its teacher is the target at ``a + d + 1``,
so an element is scored where the effective loss mask is set at ``orig = a + d``.

COD sampling (reference §4.3) keeps every position at depth 0 and a shrinking random share of
the chains at deeper depths. Each sample draws from its own CPU generator seeded by
``(cod_seed, step, sample id)``, so a resumed run, any batch composition and any world size
draw the same elements for the same sample.

Rows of a batch are independent documents (right padding), or several packed documents when
the batch carries ``document_ids``; attention never crosses a document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specforge_lightning.algorithms.eagle3.loss import effective_loss_mask


@dataclass
class Elements:
    """A batch of elements, right-padded per row to the longest row (``valid`` False on padding).

    ``anchor``, ``depth``, ``orig`` (= anchor + depth) and ``position_ids`` (RoPE position of
    ``orig`` inside its document) are (B, N) int64; ``allowed`` (B, N, N) bool is the attention mask.
    """

    anchor: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    orig: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor

    def to(self, device: torch.device | str) -> Elements:
        return Elements(*(t.to(device) for t in (self.anchor, self.depth, self.valid, self.orig,
                                                 self.position_ids, self.allowed)))


def document_ids(attention_mask: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) int64 document id of every position, -1 on padding (one document per row unless ``packed``)."""
    real = attention_mask.bool()
    docs = torch.zeros_like(attention_mask, dtype=torch.long) if packed is None else packed.long()
    return torch.where(real, docs, torch.full_like(docs, -1))


def document_positions(docs: torch.Tensor) -> torch.Tensor:
    """(B, S) position of every token inside its document (RoPE restarts at each document)."""
    B, S = docs.shape
    t = torch.arange(S, device=docs.device).expand(B, S)
    start = torch.ones_like(docs, dtype=torch.bool)
    start[:, 1:] = docs[:, 1:] != docs[:, :-1]
    first = torch.cummax(torch.where(start, t, torch.zeros_like(t)), dim=1).values
    return t - first


def supervised_mask(loss_mask: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """(B, S) int64: supervised positions whose teacher (the next position) lies in the same document."""
    mask = effective_loss_mask(loss_mask, (docs >= 0).long())
    same_next = torch.zeros_like(mask)
    same_next[:, :-1] = (docs[:, 1:] == docs[:, :-1]).long()
    return mask * same_next


def cod_sample(
    supervised: torch.Tensor,
    docs: torch.Tensor,
    num_depths: int,
    ratio: float,
    ratio_min: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's elements: ``(anchor, depth)`` 1-D int64 (CPU), depth-major, positions ascending.

    Depth 0: every real position. Depth d >= 1: of the candidates (depth 1: the supervised
    positions; later: ``p + 1`` of the previous depth's picks where that is supervised), those
    whose anchor ``p - d`` exists in the same document; ``int((n_sup - d) · max(ratio^d,
    ratio_min))`` of them are drawn uniformly (all of them when fewer are eligible).
    """
    supervised, docs = supervised.bool().cpu(), docs.cpu()
    S = supervised.shape[0]
    real = torch.nonzero(docs >= 0).flatten()
    anchors, depths = [real], [torch.zeros_like(real)]
    candidates = torch.nonzero(supervised).flatten()
    n_sup = candidates.numel()
    for d in range(1, num_depths):
        size = int((n_sup - d) * max(ratio**d, ratio_min))
        if size <= 0:
            break
        ok = candidates >= d
        eligible = candidates[ok]
        eligible = eligible[docs[eligible - d] == docs[eligible]]
        if eligible.numel() > size:
            eligible = eligible[torch.randperm(eligible.numel(), generator=generator)[:size]].sort().values
        if eligible.numel() == 0:
            break
        anchors.append(eligible - d)
        depths.append(torch.full_like(eligible, d))
        nxt = eligible + 1
        nxt = nxt[nxt < S]
        candidates = nxt[supervised[nxt]]
    return torch.cat(anchors), torch.cat(depths)


def all_chains(docs: torch.Tensor, num_depths: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's elements without down-sampling: every anchor at every depth whose ``orig`` is in its document."""
    docs = docs.cpu()
    S = docs.shape[0]
    anchors, depths = [], []
    for d in range(num_depths):
        a = torch.arange(max(0, S - d))
        a = a[(docs[a] >= 0) & (docs[a + d] == docs[a])]
        anchors.append(a)
        depths.append(torch.full_like(a, d))
    return torch.cat(anchors), torch.cat(depths)


def attention_allowed(anchor: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """(B, N, N) bool: query i may see key j (reference §4.3).

    Both real and in the same document, and either j is a depth-0 element at an anchor <= i's,
    or j is on i's own chain (same anchor) at a depth <= i's.
    """
    q_a, k_a = anchor[:, :, None], anchor[:, None, :]
    q_d, k_d = depth[:, :, None], depth[:, None, :]
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    rule = ((k_d == 0) & (q_a >= k_a)) | ((q_a == k_a) & (q_d >= k_d))
    return rule & same_doc & valid[:, :, None] & valid[:, None, :]


def pack_elements(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], docs: torch.Tensor) -> Elements:
    """Right-pad per-row ``(anchor, depth)`` lists into an :class:`Elements` batch on ``docs``' device."""
    B, S = docs.shape
    N = max(1, max(a.numel() for a, _ in rows))
    anchor = torch.zeros(B, N, dtype=torch.long)
    depth = torch.zeros(B, N, dtype=torch.long)
    valid = torch.zeros(B, N, dtype=torch.bool)
    for b, (a, d) in enumerate(rows):
        anchor[b, : a.numel()], depth[b, : a.numel()], valid[b, : a.numel()] = a, d, True
    device = docs.device
    anchor, depth, valid = anchor.to(device), depth.to(device), valid.to(device)
    orig = (anchor + depth).clamp(max=S - 1)
    pos = document_positions(docs).gather(1, orig)
    doc = torch.where(valid, docs.gather(1, anchor), torch.full_like(anchor, -1))
    return Elements(anchor, depth, valid, orig, pos, attention_allowed(anchor, depth, valid, doc))


def sample_elements(
    supervised: torch.Tensor,
    docs: torch.Tensor,
    seeds: Sequence[int],
    num_depths: int,
    ratio: float,
    ratio_min: float,
) -> Elements:
    """COD-sampled elements of a batch, row ``b`` drawn from a generator seeded with ``seeds[b]``."""
    if len(seeds) != supervised.shape[0]:
        raise ValueError(f"need one seed per sample, got {len(seeds)} for {supervised.shape[0]}")
    rows = [
        cod_sample(supervised[b], docs[b], num_depths, ratio, ratio_min, torch.Generator().manual_seed(int(seeds[b])))
        for b in range(supervised.shape[0])
    ]
    return pack_elements(rows, docs)


__all__ = [
    "Elements",
    "all_chains",
    "attention_allowed",
    "cod_sample",
    "document_ids",
    "document_positions",
    "pack_elements",
    "sample_elements",
    "supervised_mask",
]
