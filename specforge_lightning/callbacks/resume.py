"""Exact resume: every rank's data position and RNG in the checkpoint, and a run-identity check first.

Lightning writes the checkpoint from rank 0 only, and its own loader state is
rank 0's *prefetched* position (it fetches one batch ahead). ``ResumeState``
therefore gathers each rank's *trained* position (``batch_index + 1`` of the
last batch it trained) and RNG states into one record,
``checkpoint["specforge_resume"] = {"world_size": W, "ranks": {"0": ..., "1": ...}, ...}``,
drops Lightning's copy, and on load hands each rank its own entry.

Before anything is restored (the check runs inside the checkpoint load, see
``SafeCheckpointIO``) a resume is refused, naming every difference, when the
world size, the algorithm, its loss options, the batch size, gradient
accumulation, the data seed or the feature manifest changed.

The resume rule for the command line: **the configuration given now wins for
everything**; checkpoint hyperparameters are never merged over it. What may
not change is refused by the check above, so a changed value is either
honoured (e.g. ``lr``, ``max_steps``, logging) or refused, never silently
dropped. (LightningCLI's default merges the checkpoint's hyperparameters over
the command line for an explicit checkpoint path; ``cli.py`` turns that off.)
Starting a new run from trained weights only is ``ResumeState(warm_start_from=path)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from specforge_lightning.callbacks.checkpoint_io import CheckpointError, ExactResume, install_safe_io, read_checkpoint
from specforge_lightning.contracts import StrategySpec
from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.manifest import IDENTITY_FIELDS

log = logging.getLogger(__name__)

RESUME_KEY = "specforge_resume"
RESUME_VERSION = 1
# Manifest fields that say what the features ARE.
MANIFEST_IDENTITY = IDENTITY_FIELDS


class ResumeMismatchError(CheckpointError):
    """The checkpoint belongs to a different run configuration; the message names each difference."""


class AlgorithmModule(Protocol):
    """What ResumeState reads of the module: the StrategySpec every algorithm's module declares."""

    strategy_spec: StrategySpec


@runtime_checkable
class TakesTrainState(Protocol):
    """A datamodule that can start its train loader at a saved position (``FeatureDataLoader.state_dict`` format)."""

    def load_train_state(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), python and numpy RNG states, as types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- identity


def manifest_hash(manifest: Mapping[str, Any] | None) -> str | None:
    """sha256 over the manifest's identity fields (None when the run has no prepared features)."""
    if not manifest:
        return None
    identity = {k: manifest.get(k) for k in MANIFEST_IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """JSON-like form, so a tuple from the CLI equals a list from a checkpoint."""
    return json.loads(json.dumps(value, default=str))


def run_identity(trainer: L.Trainer, pl_module: L.LightningModule, strict_hparams: Sequence[str]) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming from it."""
    dm = trainer.datamodule
    hparams = dict(pl_module.hparams)
    refs = getattr(dm, "refs", None)
    cls = type(pl_module)
    return {
        "world_size": trainer.world_size,
        "algorithm": f"{cls.__module__}.{cls.__qualname__}",
        "hparams": {k: _plain(hparams[k]) for k in strict_hparams if k in hparams},
        "batch_size": getattr(dm, "batch_size", None),
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "data_seed": getattr(dm, "seed", None),
        "num_train_samples": len(refs["train"]) if isinstance(refs, Mapping) and "train" in refs else None,
        "feature_manifest": manifest_hash(getattr(dm, "manifest", None)),
    }


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: checkpoint X, this run Y"`` for every field both sides know and disagree on."""
    diffs = []
    for key in sorted(set(saved) & set(current)):
        old, new = saved[key], current[key]
        if key == "hparams":
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    diffs.append(f"{name}: checkpoint {old.get(name)!r}, this run {new.get(name)!r}")
        elif old != new:
            label = "feature manifest (identity fields hash)" if key == "feature_manifest" else key
            diffs.append(f"{label}: checkpoint {old!r}, this run {new!r}")
    return diffs


def _gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _drop_lightning_loader_state(checkpoint: dict[str, Any]) -> None:
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    fit_loop.get("state_dict", {}).pop("combined_loader", None)


# --------------------------------------------------------------------------- callback


class ResumeState(ExactResume, Callback):
    """Saves every rank's trained data position and RNG; validates and restores them on ``fit(ckpt_path=...)``.

    Put it next to ``SpecForgeCheckpoint``. Saves must happen on every rank at
    once (as Lightning's ``trainer.save_checkpoint`` requires): the state is
    gathered across ranks inside the save.

    Args:
        warm_start_from: a checkpoint whose module weights (only) start a NEW run: no
            optimizer, data position, step or RNG is taken from it, and no run-identity
            check applies. Ignored when the run resumes (``ckpt_path`` given): the resumed
            checkpoint already holds the warm-started weights.
        strict_hparams: module hyperparameters that may not change on resume, on top of those
            the module's ``strategy_spec.resume_strict_hparams`` declares (its loss options).

    Raises:
        ResumeMismatchError: on load, when the run differs from the checkpoint's run.
        CheckpointError: on load, when the file is unreadable or lacks the resume state.
    """

    def __init__(self, warm_start_from: str | None = None, strict_hparams: Sequence[str] | None = None) -> None:
        self.warm_start_from = warm_start_from
        self.strict_hparams = tuple(strict_hparams or ())
        self._trainer: L.Trainer | None = None
        self._module: L.LightningModule | None = None
        self._trained: tuple[int, int] | None = None  # (epoch, next batch index) after the last trained batch
        self._restored: tuple[int, int] | None = None
        self._pending_rng: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return "ResumeState"

    def _strict(self, pl_module: AlgorithmModule) -> tuple[str, ...]:
        return tuple(dict.fromkeys(pl_module.strategy_spec.resume_strict_hparams + self.strict_hparams))

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module
        self._trained = self._restored = self._pending_rng = None
        io = install_safe_io(trainer)
        if io is None:
            log.warning("ResumeState cannot check checkpoints before they are restored with this checkpoint IO")
        elif self._validate not in io.validators:
            io.validators.append(self._validate)

    # -- validation (runs inside the checkpoint load, before any state is restored) ----

    def _validate(self, checkpoint: dict[str, Any], path: str) -> None:
        trainer, module = self._trainer, self._module
        if trainer is None or module is None or trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict only read weights
        state = checkpoint.get(RESUME_KEY)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"checkpoint {path} holds no resume state (it was not written with ResumeState), so training "
                "cannot continue exactly from it; start a new run from its weights with "
                "ResumeState(warm_start_from=...)"
            )
        if state.get("version") != RESUME_VERSION:
            raise CheckpointError(f"checkpoint {path} has resume state version {state.get('version')!r}; this reads {RESUME_VERSION}")
        diffs = identity_differences(state.get("identity", {}), run_identity(trainer, module, self._strict(module)))
        if diffs:
            raise ResumeMismatchError(
                f"cannot resume from {path}: this run differs from the checkpoint's run in "
                + "; ".join(diffs)
                + ". Restore those settings, or start a new run from its weights with ResumeState(warm_start_from=...)"
            )
        ranks = state.get("ranks", {})
        missing = [r for r in range(trainer.world_size) if str(r) not in ranks]
        if missing or state.get("world_size") != trainer.world_size:
            raise ResumeMismatchError(
                f"cannot resume from {path}: it holds ranks {sorted(ranks)} of world size {state.get('world_size')}, "
                f"this run has world size {trainer.world_size}"
            )

    # -- recording ------------------------------------------------------------------------

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        meta = getattr(batch, "metadata", None)
        if isinstance(meta, Mapping) and "epoch" in meta and "batch_index" in meta:
            self._trained = (int(meta["epoch"]), int(meta["batch_index"]) + 1)

    def _loader_state(self, trainer: L.Trainer) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(shared fields, this rank's entry) in ``FeatureDataLoader.state_dict`` format, at the trained position."""
        loader = trainer.train_dataloader
        if not isinstance(loader, FeatureDataLoader) or loader.refs is None:
            return None
        state = loader.state_dict()
        entry = dict(state["ranks"][str(loader.rank)])
        # Nothing trained or restored in this process: the loader has not started, so its own state is exact.
        epoch, done = self._trained or self._restored or (entry["epoch"], entry["batches_done"])
        if done >= len(loader):  # end of an epoch is the start of the next
            epoch, done = epoch + 1, 0
        entry.update(epoch=epoch, batches_done=done)
        shared = {k: v for k, v in state.items() if k != "ranks"}
        return shared, entry

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        _drop_lightning_loader_state(checkpoint)  # rank 0's prefetched position; ours replaces it
        loader = self._loader_state(trainer)
        local = {"rng": capture_rng(), "loader": loader[1] if loader else None}
        gathered = _gather(local)
        checkpoint[RESUME_KEY] = {
            "version": RESUME_VERSION,
            "world_size": len(gathered),
            "identity": run_identity(trainer, pl_module, self._strict(pl_module)),
            "loader": loader[0] if loader else None,
            "ranks": {str(rank): entry for rank, entry in enumerate(gathered)},
        }

    # -- restoring ------------------------------------------------------------------------

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        _drop_lightning_loader_state(checkpoint)
        state = checkpoint.get(RESUME_KEY)
        if not isinstance(state, dict):  # only reachable when the IO could not be wrapped
            raise CheckpointError("the checkpoint holds no resume state (it was not written with ResumeState)")
        ranks = state["ranks"]
        mine = ranks[str(trainer.global_rank)]
        self._pending_rng = mine["rng"]
        if mine.get("loader") is not None and state.get("loader") is not None:
            loader_state = {**state["loader"], "ranks": {r: e["loader"] for r, e in ranks.items()}}
            self._restored = (int(mine["loader"]["epoch"]), int(mine["loader"]["batches_done"]))
            datamodule = trainer.datamodule
            if not isinstance(datamodule, TakesTrainState):
                raise CheckpointError(
                    f"{type(datamodule).__name__} cannot take a train position: ResumeState needs a datamodule "
                    "with load_train_state (FeatureDataModule, StreamDataModule)"
                )
            datamodule.load_train_state(loader_state)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the sanity check and everything else that may draw random numbers at start-up.
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    # -- warm start -----------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.warm_start_from:
            return
        if trainer.ckpt_path:
            log.info("resuming from %s: warm_start_from=%s is not applied again", trainer.ckpt_path, self.warm_start_from)
            return
        checkpoint = read_checkpoint(self.warm_start_from, required=("state_dict",))
        try:
            pl_module.load_state_dict(checkpoint["state_dict"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"cannot warm start from {self.warm_start_from}: {e}") from e
        log.info("warm start: module weights from %s (optimizer, step and data position start fresh)", self.warm_start_from)
