"""Block drafting with a DSpark draft: one backbone forward, then the Markov head slot by slot, cut by confidence.

Slot p reads the backbone hidden of its slot and the token drafted before it (the anchor
for p = 0), exactly as training teacher-forces the true ones. Beyond upstream, the draft is
*scheduled by confidence*: with ``confidence_threshold`` set, the drafter stops before slot p
when the predicted probability that the target accepts every token up to p,
``Π_{i≤p} σ(conf_i)``, falls below the threshold (``min_draft_tokens`` are always proposed).
A verify step then carries fewer tokens the target would reject; the output is the target's
greedy output either way (the target verifies whatever is proposed).
"""

from __future__ import annotations

import math

import torch

from specforge_lightning.algorithms.dflash.drafter import BLOCK_SIMULATED_DEFINITION, BlockDrafter
from specforge_lightning.algorithms.dspark.model import DSparkDraft

DSPARK_DRAFTING = (
    "block (one draft forward, then the Markov head reads each drafted token before the next slot, top-1), "
    "verify k+1 tokens per target forward"
)
SCHEDULED_DRAFTING = DSPARK_DRAFTING + (
    "; confidence-scheduled: stop before slot p once prod_{{i<=p}} sigmoid(conf_i) < {threshold} "
    "(at least {minimum} tokens)"
)
DSPARK_SIMULATED_DEFINITION = BLOCK_SIMULATED_DEFINITION + (
    " (Markov head fed the true previous tokens; confidence scheduling is not simulated)"
)


class DSparkBlockDrafter(BlockDrafter):
    """``BlockDrafter`` whose tokens come from DSpark's Markov-biased logits, optionally confidence-scheduled.

    Args:
        draft: the DSpark draft.
        confidence_threshold: None (default) drafts the whole block, as upstream; a value in (0, 1)
            stops once the predicted cumulative acceptance drops below it. Needs a confidence head.
        min_draft_tokens: tokens proposed before the threshold may stop the block (default 1).
    """

    draft: DSparkDraft
    simulated_definition = DSPARK_SIMULATED_DEFINITION

    def __init__(self, draft: DSparkDraft, confidence_threshold: float | None = None, min_draft_tokens: int = 1) -> None:
        super().__init__(draft)
        if confidence_threshold is not None:
            if draft.confidence_head is None:
                raise ValueError("confidence_threshold needs a draft with a confidence head (enable_confidence_head)")
            if not 0.0 < confidence_threshold < 1.0:
                raise ValueError(f"confidence_threshold must lie in (0, 1), got {confidence_threshold}")
        if min_draft_tokens < 0:
            raise ValueError(f"min_draft_tokens must be >= 0, got {min_draft_tokens}")
        self.confidence_threshold = confidence_threshold
        self.min_draft_tokens = int(min_draft_tokens)
        self.stopped_early = 0  # blocks cut by the threshold (for reports)

    @property
    def description(self) -> str:  # type: ignore[override]
        if self.confidence_threshold is None:
            return DSPARK_DRAFTING
        return SCHEDULED_DRAFTING.format(threshold=self.confidence_threshold, minimum=self.min_draft_tokens)

    def decode(self, hidden: torch.Tensor, anchor_token: int, k: int) -> list[int]:
        """Greedy tokens of slots ``0..k-1`` through the Markov head, cut where the confidence schedule says."""
        d = self.draft
        normed = d.norm(hidden[:k])
        base = d.head_logits(normed, None)
        out: list[int] = []
        prev, state, log_reach = anchor_token, None, 0.0
        for p in range(k):
            prev_t = torch.tensor(prev, dtype=torch.long, device=self.device)
            if self.confidence_threshold is not None:
                log_reach += float(torch.nn.functional.logsigmoid(d.confidence_logits(normed[p], prev_t).float()))
                if p >= self.min_draft_tokens and log_reach < math.log(self.confidence_threshold):
                    self.stopped_early += 1
                    break
            logits = base[p]
            if d.markov_head is not None:
                z, state = d.markov_head.step(prev_t, normed[p], state)
                logits = logits + d.markov_head.bias(z).to(logits.dtype)
            prev = int(logits.argmax(-1))
            out.append(prev)
        return out

    def teacher_forced_predictions(self, hidden: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
        """Greedy predictions (N, k) with the true previous tokens ``x_a..x_{a+k-1}`` fed to the Markov head."""
        normed = self.draft.norm(hidden[:, :k])
        prev_pos = (anchors[:, None] + torch.arange(k, device=ids.device)).clamp(max=len(ids) - 1)
        z = self.draft.markov_latents(ids[prev_pos], normed)
        return self.draft.head_logits(normed, z).argmax(-1)


__all__ = ["DSPARK_DRAFTING", "DSPARK_SIMULATED_DEFINITION", "DSparkBlockDrafter"]
