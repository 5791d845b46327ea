"""Domino: DFlash with a GRU logit correction over the previous tokens."""

from specforge_lightning.algorithms.dflash.export import BlockFamily
from specforge_lightning.algorithms.domino.drafter import DominoBlockDrafter
from specforge_lightning.algorithms.domino.loss import DominoLossOutput, domino_loss, lambda_base
from specforge_lightning.algorithms.domino.model import DominoConfig, DominoDraft
from specforge_lightning.algorithms.domino.module import DominoModule

ALGORITHM = BlockFamily("domino", DominoModule, DominoConfig, DominoDraft, DominoBlockDrafter).algorithm()

__all__ = [
    "ALGORITHM",
    "DominoBlockDrafter",
    "DominoConfig",
    "DominoDraft",
    "DominoLossOutput",
    "DominoModule",
    "domino_loss",
    "lambda_base",
]
