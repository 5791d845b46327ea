"""A toy algorithm that lives outside the package: proof that an algorithm plugs in through the one seam.

It registers itself when imported (as LightningCLI imports ``model.class_path``, and as the
registry imports the module named in a checkpoint), and touches no generic module.
"""

from specforge_lightning.algorithms.registry import register
from tests.toy_algorithm.module import ALGORITHM, ToyModule

register(ALGORITHM)

__all__ = ["ALGORITHM", "ToyModule"]
