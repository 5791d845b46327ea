"""DFlash: a block-parallel draft on the target's spread layers, with the target's frozen embedding and head."""

from specforge_lightning.algorithms.dflash.loss import (
    BlockCounts,
    DFlashLossOutput,
    anchor_seed,
    block_counts,
    block_labels,
    dflash_loss,
    dpace_weights,
    sample_anchors,
    valid_anchors,
)
from specforge_lightning.algorithms.dflash.model import DFlashConfig, DFlashDraft, block_attention_mask
from specforge_lightning.algorithms.dflash.module import BlockAcceptanceMetric, DFlashModule, resolve_mask_token_id

__all__ = [
    "BlockAcceptanceMetric",
    "BlockCounts",
    "DFlashConfig",
    "DFlashDraft",
    "DFlashLossOutput",
    "DFlashModule",
    "anchor_seed",
    "block_attention_mask",
    "block_counts",
    "block_labels",
    "dflash_loss",
    "dpace_weights",
    "resolve_mask_token_id",
    "sample_anchors",
    "valid_anchors",
]
