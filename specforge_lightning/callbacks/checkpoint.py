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
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

log = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step-(\d+)\.ckpt$")
TEMP_MARKER = ".tmp-"
TRAINING_KEYS = ("state_dict", "pytorch-lightning_version", "global_step", "loops")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, truncated or not what this run can load; the message names it."""


# --------------------------------------------------------------------------- files


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}{TEMP_MARKER}{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _link_atomic(folder: str, link_name: str, target_name: str) -> bool:
    """Point ``folder/link_name`` at ``target_name`` (relative); False where symlinks are not allowed."""
    tmp = os.path.join(folder, f".{link_name}{TEMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        os.symlink(target_name, tmp)
        os.replace(tmp, os.path.join(folder, link_name))
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False


def read_record(dirpath: _PATH, name: str) -> dict[str, Any] | None:
    """The ``last``/``best`` JSON record in ``dirpath``, or None (a corrupt record is reported and ignored)."""
    path = os.path.join(os.fspath(dirpath), f"{name}.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable checkpoint record %s: %s", path, e)
        return None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        log.warning("ignoring checkpoint record %s: it names no checkpoint file", path)
        return None
    return record


def resolve_pointer(dirpath: _PATH, name: str) -> str | None:
    """Absolute path of the checkpoint that ``name`` (``last`` or ``best``) points at, if that file exists."""
    folder = os.fspath(dirpath)
    record = read_record(folder, name)
    if record is not None:
        path = os.path.join(folder, record["path"])
        if os.path.isfile(path):
            return os.path.abspath(path)
    link = os.path.join(folder, f"{name}.ckpt")
    if os.path.isfile(link):  # follows a symlink; also a plain copy left by other tools
        return os.path.abspath(os.path.realpath(link))
    return None


def find_last_checkpoint(dirpath: _PATH) -> str | None:
    return resolve_pointer(dirpath, "last")


def find_best_checkpoint(dirpath: _PATH) -> str | None:
    return resolve_pointer(dirpath, "best")


def read_checkpoint(
    path: _PATH,
    io: CheckpointIO | None = None,
    required: Sequence[str] = TRAINING_KEYS,
    map_location: Any = "cpu",
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Load and structurally check a checkpoint; every failure is a CheckpointError naming the file."""
    path = os.fspath(path)
    if "://" not in path and not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    io = io or TorchCheckpointIO()
    try:
        checkpoint = io.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises several types for truncated, corrupt and foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated, corrupt, or not a torch checkpoint): "
            f"{type(e).__name__}: {reason}"
        ) from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a Lightning training checkpoint: it lacks {missing} "
            f"(its keys: {sorted(map(str, checkpoint))[:8]})"
        )
    return checkpoint


class SafeCheckpointIO(CheckpointIO):
    """Writes through a temp name and ``os.replace``; checks every loaded file before anything is restored.

    ``validators`` are called as ``fn(checkpoint, path)`` after a load and may
    raise to refuse the file; Lightning restores nothing until the load returns.
    """

    def __init__(self, inner: CheckpointIO | None = None) -> None:
        self.inner = inner or TorchCheckpointIO()
        self.validators: list[Callable[[dict[str, Any], str], None]] = []

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if "://" in path:  # remote filesystems have their own semantics; no rename there
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self.inner.save_checkpoint(checkpoint, tmp, storage_options=storage_options)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = read_checkpoint(path, self.inner, map_location=map_location or "cpu", weights_only=weights_only)
        for validate in self.validators:
            validate(checkpoint, os.fspath(path))
        return checkpoint

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


def install_safe_io(trainer: L.Trainer) -> SafeCheckpointIO | None:
    """Wrap the strategy's plain torch CheckpointIO in a SafeCheckpointIO (once); None if it is something else."""
    io = trainer.strategy.checkpoint_io
    if isinstance(io, SafeCheckpointIO):
        return io
    if type(io) is not TorchCheckpointIO:
        log.warning("checkpoint IO %s is kept as is: its writes are not made atomic", type(io).__name__)
        return None
    safe = SafeCheckpointIO(io)
    trainer.strategy.checkpoint_io = safe
    return safe


# --------------------------------------------------------------------------- callback


class SpecForgeCheckpoint(ModelCheckpoint):
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
        self._step_at_batch_start = 0
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
        from specforge_lightning.callbacks.resume import ResumeState  # resume imports this module

        if stage == TrainerFn.FITTING and not any(isinstance(cb, ResumeState) for cb in trainer.callbacks):
            log.warning("SpecForgeCheckpoint without ResumeState: checkpoints will not resume the data position exactly")

    def _remove_stale_temps(self) -> None:
        for name in os.listdir(self.dirpath):
            if name.startswith(".") and TEMP_MARKER in name:
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
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._skip(trainer) or trainer.global_step == self._step_at_batch_start:
            return  # still accumulating: never save between micro-batches
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
            _write_json_atomic(os.path.join(self.dirpath, "best.json"), record)
            _link_atomic(self.dirpath, "best.ckpt", name)
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
            _write_json_atomic(os.path.join(self.dirpath, "last.json"), record)
            _link_atomic(self.dirpath, "last.ckpt", name)
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
