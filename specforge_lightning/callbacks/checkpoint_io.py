"""Checkpoint files: complete-or-invisible writes, the ``last``/``best`` records, checked reads.

The file side of checkpointing, apart from the callback that decides WHEN to save
(``checkpoint.py``) and the one that decides WHAT a resume restores (``resume.py``);
both build on this module, which imports neither.

A read never unpickles code: ``read_checkpoint`` loads with ``weights_only=True``
unless the caller says the file is trusted (``--trust_checkpoint`` on the command line),
and a refusal names the file and that flag, not torch's own advice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from specforge_lightning.errors import UserError
from specforge_lightning.files import atomic_path, temp_name

log = logging.getLogger(__name__)

TRAINING_KEYS = ("state_dict", "pytorch-lightning_version", "global_step", "loops")
TRUST_FLAG = "--trust_checkpoint"


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable, truncated or not what this run can load; the message names it."""


class ExactResume:
    """Marker base of a callback that saves and restores the data position exactly (``ResumeState``).

    Lets ``SpecForgeCheckpoint`` notice that none is present without importing the resume module.
    """


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def link_atomic(folder: str, link_name: str, target_name: str) -> bool:
    """Point ``folder/link_name`` at ``target_name`` (relative); False where symlinks are not allowed."""
    tmp = temp_name(os.path.join(folder, link_name))
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
    """Load and structurally check a checkpoint; every failure is a CheckpointError naming the file.

    ``weights_only`` None means True: only tensors and plain types are read. False (the file is
    trusted) lets pickled objects through, which runs code from the file.
    """
    path = os.fspath(path)
    if "://" not in path and not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    io = io or TorchCheckpointIO()
    weights_only = True if weights_only is None else weights_only
    try:
        checkpoint = io.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if not weights_only or "unsupported global" not in str(e).lower():  # foreign bytes, not a refused class
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"checkpoint {path} cannot be read (truncated, corrupt, or not a torch checkpoint): "
                f"UnpicklingError: {first}"
            ) from e
        raise CheckpointError(
            f"checkpoint {path} holds pickled objects other than tensors and plain types, and loading those "
            f"runs code from the file. If you wrote it yourself and trust it, pass {TRUST_FLAG}"
        ) from None
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
        with atomic_path(path) as tmp:
            self.inner.save_checkpoint(checkpoint, tmp, storage_options=storage_options)

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


__all__ = [
    "TRAINING_KEYS",
    "TRUST_FLAG",
    "CheckpointError",
    "ExactResume",
    "SafeCheckpointIO",
    "checkpoint_name",
    "find_best_checkpoint",
    "find_last_checkpoint",
    "install_safe_io",
    "link_atomic",
    "read_checkpoint",
    "read_record",
    "resolve_pointer",
]
