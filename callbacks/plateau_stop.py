"""PlateauStop: end training once validation acceptance length stops improving.

    --trainer.callbacks+=callbacks.plateau_stop.PlateauStop \
    --trainer.callbacks.patience=3 --trainer.callbacks.min_delta=0.01

After each validation it compares ``monitor`` (default ``val/acceptance_length``, higher is
better) with the best so far: a gain of more than ``min_delta`` resets the count, anything
else adds one; after ``patience`` such validations it sets ``trainer.should_stop``. The
run then ends as a preemption does: the step finishes, the final checkpoint is written.
Why it stopped is in ``self.reason`` and, on rank 0, in ``<default_root_dir>/plateau_stop.json``.
Its count is saved in the checkpoint, so a resumed run keeps counting where it left off.
Hooks used: ``on_validation_end`` only, so it also runs under the ``fabric`` command.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning as L


class PlateauStop(L.Callback):
    def __init__(self, patience: int = 3, min_delta: float = 0.0, monitor: str = "val/acceptance_length") -> None:
        if patience < 1:
            raise ValueError(f"PlateauStop: patience must be >= 1, got {patience}")
        self.patience, self.min_delta, self.monitor = patience, min_delta, monitor
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.reason: str | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])  # already reduced over ranks
        if self.best is None or (not math.isnan(value) and value > self.best + self.min_delta):
            self.best, self.best_step, self.wait = value, trainer.global_step, 0
            return
        self.wait += 1
        # Every rank decides on the same reduced value; rank 0's word makes that certain.
        if not trainer.strategy.broadcast(self.wait >= self.patience):
            return
        trainer.should_stop = True
        self.reason = (
            f"{self.monitor} did not improve by more than {self.min_delta} for {self.wait} validations "
            f"(best {self.best:.4f} at step {self.best_step}, now {value:.4f} at step {trainer.global_step})"
        )
        if trainer.is_global_zero:
            record = {"stopped_at_step": trainer.global_step, "reason": self.reason, "best": self.best,
                      "best_step": self.best_step, "monitor": self.monitor}
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            with open(os.path.join(trainer.default_root_dir, "plateau_stop.json"), "w") as f:
                json.dump(record, f, indent=2)
            print(f"PlateauStop: stopping: {self.reason}")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_step, self.wait = state_dict["best"], state_dict["best_step"], state_dict["wait"]
