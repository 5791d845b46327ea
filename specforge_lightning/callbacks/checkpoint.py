"""Checkpoints that are complete or invisible, with a cadence, rotation and a best that survives restarts.

Layout under ``<default_root_dir>/checkpoints/`` (or ``dirpath``)::

    step-00000500.ckpt     one file per saved optimizer step
    last.json  last.ckpt   the newest checkpoint (JSON pointer; symlink where the filesystem allows)
    best.json  best.ckpt   the best by ``monitor`` (JSON record: metric, mode, score, step, path)

Every file is written under a hidden temp name and renamed into place, so a
write killed half-way leaves the previous ``last`` valid and nothing partial
visible. The JSON records are the durable truth: they are read back when a run
(re)starts, so a worse score never replaces the best and rotation never
deletes the best or the last.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from specforge_lightning.callbacks.checkpoint_io import (
    ExactResume,
    checkpoint_name,
    find_last_checkpoint,
    install_safe_io,
    link_atomic,
    read_record,
)
from specforge_lightning.callbacks.step_boundary import AfterOptimizerStep
from specforge_lightning.files import is_temp_name, write_json_atomic

log = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step-(\d+)\.ckpt$")


class SpecForgeCheckpoint(AfterOptimizerStep, ModelCheckpoint):
    """Save every ``every_n_train_steps`` optimizer steps, keep the newest ``keep_last``, track the best.

    Best tracking runs on EVERY validation: a new best that lands between two
    cadence saves is saved on demand. Whenever fit stops (``max_steps``, end of
    data, ``trainer.should_stop`` from preemption or early stopping) a final
    checkpoint is written and becomes ``last``. ``fit(ckpt_path="last")`` finds
    it (Lightning asks this callback, before setup); ``"best"`` uses the durable record
    once it is known: after setup, or from the start when ``dirpath`` is given.

    Args:
        dirpath: where checkpoints go; default ``<trainer.default_root_dir>/checkpoints``
            (not the logger's versioned folder, so a restarted run finds them).
        every_n_train_steps: save cadence in optimizer steps; 0 disables periodic saves.
        keep_last: how many step checkpoints to keep (newest first); the best and the
            last are kept on top; 0 keeps all.
        monitor: metric for best tracking (None disables it); mode ``"max"`` or ``"min"``.
        save_final: write a checkpoint when fit stops.

    Example::

        trainer = Trainer(callbacks=[SpecForgeCheckpoint(every_n_train_steps=500), ResumeState()])
        trainer.fit(model, datamodule, ckpt_path="last")
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 500,
        keep_last: int = 3,
        monitor: str | None = "val/acceptance_length",
        mode: str = "max",
        save_final: bool = True,
        verbose: bool = False,
    ) -> None:
        if every_n_train_steps < 0 or keep_last < 0:
            raise ValueError(f"every_n_train_steps ({every_n_train_steps}) and keep_last ({keep_last}) must be >= 0")
        super().__init__(
            dirpath=dirpath,
            monitor=monitor,
            mode=mode,
            verbose=verbose,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=0,
            enable_version_counter=False,
        )
        self._explicit_dir = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.keep_last = keep_last
        self.save_final = save_final
        self.best_record: dict[str, Any] | None = None
        self.last_record: dict[str, Any] | None = None
        self._saved: dict[int, str] = {}  # step -> file name, saved by this process
        self._start_step = 0
        self._stop_saved = False
        self._warned_missing_metric = False
        if dirpath is not None:  # lets fit/validate(ckpt_path="best") resolve before setup
            self._set_best(read_record(self.dirpath, "best"))

    # -- where --------------------------------------------------------------------------

    def checkpoint_dir(self, trainer: L.Trainer) -> str:
        if self._explicit_dir is not None:
            return os.path.abspath(os.fspath(self._explicit_dir))
        return os.path.abspath(os.path.join(trainer.default_root_dir, "checkpoints"))

    @override
    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # Lightning resolves fit(ckpt_path="last") through this hook, before setup.
        path = find_last_checkpoint(self.checkpoint_dir(trainer))
        return {path} if path else set()

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = trainer.strategy.broadcast(self.checkpoint_dir(trainer))
        self._fs = get_filesystem(self.dirpath)
        install_safe_io(trainer)
        records = None
        if trainer.is_global_zero:
            os.makedirs(self.dirpath, exist_ok=True)
            self._remove_stale_temps()
            records = (read_record(self.dirpath, "best"), read_record(self.dirpath, "last"))
        best, last = trainer.strategy.broadcast(records)  # one view of the disk on every rank
        self._set_best(best)
        self.last_record = last
        self.last_model_path = os.path.join(self.dirpath, last["path"]) if last else ""
        if stage == TrainerFn.FITTING and not any(isinstance(cb, ExactResume) for cb in trainer.callbacks):
            log.warning("SpecForgeCheckpoint without ResumeState: checkpoints will not resume the data position exactly")

    def _remove_stale_temps(self) -> None:
        for name in os.listdir(self.dirpath):
            if is_temp_name(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dirpath, name))
                    log.info("removed %s, left by an interrupted checkpoint write", name)

    def _set_best(self, record: dict[str, Any] | None) -> None:
        self.best_record = record
        if record is None:
            self.best_model_path, self.best_model_score = "", None
        else:
            self.best_model_path = os.path.join(self.dirpath, record["path"])
            self.best_model_score = torch.tensor(float(record["score"]))

    # -- when ---------------------------------------------------------------------------

    def _skip(self, trainer: L.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step
        self._stop_saved = False

    @override
    def after_optimizer_step(self, trainer: L.Trainer) -> None:
        if self._skip(trainer):
            return
        step = trainer.global_step
        periodic = self.every_n_train_steps > 0 and step % self.every_n_train_steps == 0
        # Saving the final step here, not in on_train_end, keeps Lightning's loop state
        # mid-epoch; after on_train_end it would already count the epoch as finished.
        max_steps = trainer.max_steps not in (None, -1) and step >= trainer.max_steps
        stop = trainer.should_stop and not self._stop_saved  # once: min_steps may keep Lightning going
        if periodic or (self.save_final and (stop or max_steps)):
            self._stop_saved = self._stop_saved or trainer.should_stop
            self._save(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # saves follow optimizer steps and validations only

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._skip(trainer) or self.monitor is None or trainer.global_step == 0:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned_missing_metric:
                log.warning("SpecForgeCheckpoint: no %r after validation; best tracking skipped", self.monitor)
                self._warned_missing_metric = True
            return
        score = float(value)
        improved = trainer.strategy.broadcast(self._improves(score))  # rank 0 decides for all
        if not improved:
            return
        step = trainer.global_step
        name = self._saved.get(step) or os.path.basename(self._save(trainer))
        record = {"metric": self.monitor, "mode": self.mode, "score": score, "step": step, "path": name}
        if trainer.is_global_zero:
            write_json_atomic(os.path.join(self.dirpath, "best.json"), record)
            link_atomic(self.dirpath, "best.ckpt", name)
        trainer.strategy.barrier("SpecForgeCheckpoint.best")
        self._set_best(record)
        self.current_score = torch.tensor(score)
        if self.verbose:
            log.info("new best %s=%.5f at step %d: %s", self.monitor, score, step, name)

    def _improves(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.best_record is None:
            return True
        best = float(self.best_record["score"])
        return score > best if self.mode == "max" else score < best

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._skip(trainer) or not self.save_final or step == self._start_step or step in self._saved:
            return
        self._save(trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        pass  # a crash keeps the last complete checkpoint; saving now could capture a half-done step

    # -- how ----------------------------------------------------------------------------

    def _save(self, trainer: L.Trainer) -> str:
        step = trainer.global_step
        name = checkpoint_name(step)
        path = os.path.join(self.dirpath, name)
        trainer.save_checkpoint(path, weights_only=False)  # every rank gathers its state; rank 0 writes atomically
        self._saved[step] = name
        self._last_global_step_saved = step
        self._last_checkpoint_saved = path
        record = {"step": step, "path": name}
        if trainer.is_global_zero:
            write_json_atomic(os.path.join(self.dirpath, "last.json"), record)
            link_atomic(self.dirpath, "last.ckpt", name)
            self._rotate(step, name)
        trainer.strategy.barrier("SpecForgeCheckpoint.save")
        self.last_record, self.last_model_path = record, path
        if self.verbose:
            log.info("saved %s", path)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
        return path

    def _rotate(self, step: int, newest: str) -> None:
        if self.keep_last == 0:
            return
        steps = {}
        for name in os.listdir(self.dirpath):
            match = STEP_PATTERN.match(name)
            # Files past this step belong to an abandoned branch: saving that step again replaces them.
            if match and int(match.group(1)) <= step:
                steps[name] = int(match.group(1))
        keep = set(sorted(steps, key=steps.get, reverse=True)[: self.keep_last]) | {newest}
        if self.best_record is not None:
            keep.add(self.best_record["path"])
        for name in steps:
            if name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dirpath, name))

    # -- state --------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "best": self.best_record, "last": self.last_record}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The records on disk are newer than any checkpoint's copy; the copy only fills a gap.
        if self.best_record is None and state_dict.get("best") and state_dict.get("dirpath") == self.dirpath:
            self._set_best(state_dict["best"])
