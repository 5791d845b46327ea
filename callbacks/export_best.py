"""ExportBest: keep an exported copy of the best checkpoint, refreshed whenever the best improves.

    --trainer.callbacks+=callbacks.export_best.ExportBest --trainer.callbacks.format=hf

Watches the run's checkpoint callback (``SpecForgeCheckpoint``, or any ``ModelCheckpoint``):
when its ``best_model_path`` changes, rank 0 runs the ``export`` command on that file
(``python -m specforge_lightning export --format FORMAT``), so any registered algorithm works.
The folder (``<default_root_dir>/best-<format>`` unless ``output_dir`` says otherwise) is
replaced whole: an export is written next to it, then renamed into place, so a reader never
sees half a draft. ``exported.json`` in it names the checkpoint it came from.

The best is updated in the checkpoint callback's ``on_validation_end``, which Lightning runs
after every other callback's; so this looks at the next batch start and at the end of training.
Hooks used: ``on_train_batch_start``, ``on_train_end``: it also runs under the ``fabric`` command.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class ExportBest(L.Callback):
    def __init__(self, format: str = "hf", output_dir: str | None = None, dtype: str | None = None) -> None:
        self.format, self.output_dir, self.dtype = format, output_dir, dtype
        self.exported: str | None = None  # the checkpoint the folder holds (kept across a resume)

    def _folder(self, trainer: L.Trainer) -> str:
        return self.output_dir or os.path.join(trainer.default_root_dir, f"best-{self.format}")

    def _maybe_export(self, trainer: L.Trainer) -> None:
        checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if not best or best == self.exported or not os.path.isfile(best):
            return
        self.exported = best  # on every rank, so the saved state agrees
        if trainer.is_global_zero:
            self._export(best, self._folder(trainer), getattr(checkpoint, "best_model_score", None))

    def _export(self, ckpt: str, folder: str, score: Any) -> None:
        from specforge_lightning.export.command import main as export

        staging = f"{folder}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        args = ["--ckpt_path", ckpt, "--format", self.format, "--output_dir", staging]
        export(args + (["--dtype", self.dtype] if self.dtype else []))
        with open(os.path.join(staging, "exported.json"), "w") as f:
            json.dump({"checkpoint": os.path.realpath(ckpt), "score": None if score is None else float(score)}, f)
        old = f"{folder}.old"
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._maybe_export(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_export(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"exported": self.exported}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.exported = state_dict.get("exported")
