"""The Domino draft: DFlash plus a GRU logit correction over the previous tokens (reference notes §4.5).

Predicted position p of a block at anchor a predicts ``x[a+p+1]`` from the DFlash
hidden of its slot (slot p with ``shift_label``, slot p+1 without) and a GRU
state that has read the target embeddings of ``x[a], ..., x[a+p]`` (teacher
forcing in training, the drafted tokens at inference). The first
``pure_draft_prefix_len`` predicted positions keep the base (pure DFlash) logits;
later ones get ``base + embed_proj([norm(hidden); gru_state])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from specforge_lightning.algorithms.dflash.model import DFlashConfig, DFlashDraft


@dataclass
class DominoConfig(DFlashConfig):
    """DFlash geometry plus the correction head's sizes."""

    emb_dim: int = 256
    gru_hidden_dim: int = 1024
    pure_draft_prefix_len: int = 1
    shift_label: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pure_draft_prefix_len < 0:
            raise ValueError(f"pure_draft_prefix_len must be >= 0, got {self.pure_draft_prefix_len}")

    def hf_config(self) -> dict[str, Any]:
        out = super().hf_config()
        out["architectures"] = ["DominoDraftModel"]
        out["dflash_config"].update(
            projector_type="domino",
            emb_dim=self.emb_dim,
            gru_hidden_dim=self.gru_hidden_dim,
            pure_draft_prefix_len=self.pure_draft_prefix_len,
            shift_label=self.shift_label,
        )
        return out


class DominoDraft(DFlashDraft):
    """DFlash draft + ``prefix_gru`` (H → G, no bias) + ``embed_proj`` (H+G → E → SiLU → V, no biases)."""

    def __init__(self, config: DominoConfig) -> None:
        super().__init__(config)
        c = config
        self.prefix_gru = nn.GRU(c.hidden_size, c.gru_hidden_dim, num_layers=1, bias=False, batch_first=True)
        self.embed_proj = nn.Sequential(
            nn.Linear(c.hidden_size + c.gru_hidden_dim, c.emb_dim, bias=False),
            nn.SiLU(),
            nn.Linear(c.emb_dim, c.vocab_size, bias=False),
        )
        for m in self.embed_proj:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=c.initializer_range)

    def gru_states(self, prev_ids: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GRU over the previous tokens' embeddings: (B, N, P) ids → states (B, N, P, G) and the last state.

        ``state`` (1, B·N, G) continues a sequence (inference feeds one drafted token at a time).
        """
        B, N, P = prev_ids.shape
        x = self.embed(prev_ids).reshape(B * N, P, -1)
        out, last = self.prefix_gru(x, state)
        return out.reshape(B, N, P, -1), last

    def correction(self, normed_hidden: torch.Tensor, gru_state: torch.Tensor) -> torch.Tensor:
        """Vocab-sized logit correction from ``[norm(hidden); gru_state]``."""
        return self.embed_proj(torch.cat([normed_hidden, gru_state.to(normed_hidden.dtype)], dim=-1))

    def base_and_final_logits(
        self, hidden: torch.Tensor, gru_state: torch.Tensor, corrected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits ``lm_head(norm(h))`` and final logits (base + correction where ``corrected``)."""
        x = self.norm(hidden)
        base = torch.nn.functional.linear(x.to(self.lm_head.weight.dtype), self.lm_head.weight)
        corr = self.correction(x, gru_state).to(base.dtype)
        return base, base + corr * corrected[..., None].to(base.dtype)


__all__ = ["DominoConfig", "DominoDraft"]
