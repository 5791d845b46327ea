"""Algorithm name → LightningModule class. The CLI resolves ``--model eagle3`` here."""

from __future__ import annotations

import lightning as L

from specforge_lightning.algorithms.dflash import DFlashModule
from specforge_lightning.algorithms.domino import DominoModule
from specforge_lightning.algorithms.eagle3 import Eagle3Module
from specforge_lightning.contracts import StrategySpec

ALGORITHMS: dict[str, type[L.LightningModule]] = {
    "eagle3": Eagle3Module,
    "dflash": DFlashModule,
    "domino": DominoModule,
}


def get_algorithm(name: str) -> type[L.LightningModule]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}") from None


def strategy_spec(name: str) -> StrategySpec:
    """The StrategySpec an algorithm declares to the data plane."""
    return get_algorithm(name).strategy_spec
