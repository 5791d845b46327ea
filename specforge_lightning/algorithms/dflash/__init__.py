"""DFlash: a block-parallel draft on the target's spread layers, with the target's frozen embedding and head.

The package names what a user or another algorithm builds on; the sampler and D-PACE helpers stay in ``loss``.
"""

from specforge_lightning.algorithms.dflash.loss import DFlashLossOutput, block_labels, dflash_loss
from specforge_lightning.algorithms.dflash.model import DFlashConfig, DFlashDraft, block_attention_mask
from specforge_lightning.algorithms.dflash.module import BlockAcceptanceMetric, DFlashModule, resolve_mask_token_id
from specforge_lightning.algorithms.dflash.drafter import BlockDrafter
from specforge_lightning.algorithms.dflash.export import BlockFamily

ALGORITHM = BlockFamily("dflash", DFlashModule, DFlashConfig, DFlashDraft, BlockDrafter).algorithm()

__all__ = [
    "ALGORITHM",
    "BlockDrafter",
    "BlockAcceptanceMetric",
    "DFlashConfig",
    "DFlashDraft",
    "DFlashLossOutput",
    "DFlashModule",
    "block_attention_mask",
    "block_labels",
    "dflash_loss",
    "resolve_mask_token_id",
]
