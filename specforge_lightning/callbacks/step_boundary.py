"""The optimizer-step boundary that checkpointing and preemption both act on.

With gradient accumulation a train batch ends several times per optimizer step; saving or
stopping between those micro-batches would leave a half-accumulated step that no resume can
replay. A callback that derives from :class:`AfterOptimizerStep` acts only once the step is done.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class AfterOptimizerStep(Callback):
    """Calls :meth:`after_optimizer_step` at the end of the train batch that finished an optimizer step."""

    _step_at_batch_start = 0

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._step_at_batch_start:  # else still accumulating micro-batches
            self.after_optimizer_step(trainer)

    def after_optimizer_step(self, trainer: L.Trainer) -> None:
        """What the callback does once ``trainer.global_step`` has advanced; subclasses supply it."""
        raise NotImplementedError


__all__ = ["AfterOptimizerStep"]
