"""Train with Lightning Fabric: the same modules, data, callbacks and checkpoints as ``fit``, in a loop you can read.

    python -m specforge_lightning fabric --config configs/eagle3-tiny.yaml [--trainer.max_steps=40 ...]

``FabricLoop`` (``loop.py``) is the loop; ``TrainerView`` (``view.py``) is what the modules and
callbacks see as their trainer; ``checkpoint.py`` writes the Trainer's file format, so a run
started here resumes under ``fit`` and the reverse; ``command.py`` maps a recipe's
``trainer:`` section onto Fabric.
"""

from specforge_lightning.fabric.loop import FabricLoop
from specforge_lightning.fabric.view import LoopSettings, TrainerView

__all__ = ["FabricLoop", "LoopSettings", "TrainerView"]
