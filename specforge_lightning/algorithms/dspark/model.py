"""The DSpark draft: the DFlash backbone plus a Markov logit bias and a confidence head (reference notes §4.6).

Slot j of the block anchored at a predicts ``x[a+1+j]`` (every slot is scored: DFlash's
``shift_label``); its previous token is ``x[a+j]`` (the anchor for slot 0). The heads
read the slot's post-norm hidden ``h = norm(backbone)`` (what the frozen target head
reads): final logits ``lm_head(h) + W2·z`` (z from :class:`MarkovHead`), confidence
logit ``proj([h; W1[prev]])`` (or ``proj(h)`` without Markov features).
``markov_rank = 0`` leaves the pure DFlash logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.dflash.model import DFlashConfig, DFlashDraft
from specforge_lightning.algorithms.dspark.heads import MARKOV_HEAD_TYPES, ConfidenceHead, MarkovHead


@dataclass
class DSparkConfig(DFlashConfig):
    """DFlash geometry plus the heads' settings (upstream recipe: block 7, vanilla rank 256, confidence on)."""

    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0 (0 = no Markov head), got {self.markov_rank}")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {self.markov_head_type!r}")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError(
                "confidence_head_with_markov needs a Markov head: set markov_rank > 0 or "
                "confidence_head_with_markov: false"
            )

    @property
    def shift_label(self) -> bool:
        """Every slot predicts the token after its position (what ``BlockDrafter`` reads)."""
        return True

    def hf_config(self) -> dict[str, Any]:
        out = super().hf_config()
        out["architectures"] = ["DSparkDraftModel"]
        heads = {
            "markov_rank": self.markov_rank,
            "markov_head_type": self.markov_head_type,
            "enable_confidence_head": self.enable_confidence_head,
            "confidence_head_with_markov": self.confidence_head_with_markov and self.enable_confidence_head,
        }
        out["dflash_config"].update(projector_type="dspark", **heads)
        out.update(heads)  # upstream's DSparkConfig keeps them top-level
        return out


class DSparkDraft(DFlashDraft):
    """DFlash draft + ``markov_head`` (None at rank 0) + ``confidence_head`` (None when disabled)."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__(config)
        c = config
        std = c.initializer_range
        self.markov_head = (
            MarkovHead(c.markov_head_type, c.vocab_size, c.markov_rank, c.hidden_size, std) if c.markov_rank else None
        )
        self.confidence_head = None
        if c.enable_confidence_head:
            extra = c.markov_rank if c.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(c.hidden_size + extra, std)

    def markov_latents(self, prev_ids: torch.Tensor, normed: torch.Tensor) -> torch.Tensor | None:
        """Teacher-forced ``z`` (..., P, r) of whole blocks, or None without a Markov head."""
        return None if self.markov_head is None else self.markov_head.latents(prev_ids, normed)

    def head_logits(self, normed: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Final logits ``lm_head(h) + W2·z`` of post-norm rows, in the head's dtype."""
        base = F.linear(normed.to(self.lm_head.weight.dtype), self.lm_head.weight)
        return base if z is None else base + self.markov_head.bias(z).to(base.dtype)

    def confidence_logits(self, normed: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor | None:
        """Acceptance logits (...) of post-norm slots (..., H) with their previous ids (...); None without the head."""
        if self.confidence_head is None:
            return None
        features = normed
        if self.config.confidence_head_with_markov:
            features = torch.cat([normed, self.markov_head.prev_embed(prev_ids).to(normed.dtype)], dim=-1)
        return self.confidence_head(features)


__all__ = ["DSparkConfig", "DSparkDraft"]
