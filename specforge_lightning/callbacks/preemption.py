"""Graceful preemption: on SIGTERM, finish the optimizer step, save, and leave ``fit`` normally.

Lightning's own SIGTERM path raises at the next batch end, even between two
accumulated micro-batches, and never writes a checkpoint. This callback only
sets a flag in the signal handler; at the next optimizer boundary all ranks
agree (any rank signalled means all stop) and set ``trainer.should_stop``.
``SpecForgeCheckpoint`` then writes the final checkpoint at that very step and
``fit`` returns, so the process exits 0 and ``fit --ckpt_path last`` resumes
exactly. (Lightning runs one validation when ``should_stop`` is set; it does not
change the training state.)
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import lightning as L
from typing_extensions import override

from specforge_lightning.callbacks.step_boundary import AfterOptimizerStep

log = logging.getLogger(__name__)


class GracefulPreemption(AfterOptimizerStep):
    """Turn SIGTERM (or ``signals``) into a clean stop at the next optimizer step.

    Args:
        signals: names of the signals to catch, e.g. ``["SIGTERM", "SIGUSR1"]``.

    The agreement is one tiny all-reduce per optimizer step on multi-process runs.
    A stop is not possible before ``min_steps``/``min_epochs`` (Lightning's rule).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM",)) -> None:
        self.signals = tuple(signals)
        for name in self.signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"unknown signal {name!r}")
        self.requested = False
        self.stopped_at_step: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True  # only a flag: no I/O, no collectives inside a signal handler

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning registered its handlers, so ours replaces its SIGTERM path.
        self.requested, self.stopped_at_step = False, None
        if threading.current_thread() is not threading.main_thread():
            log.warning("GracefulPreemption: not on the main thread, signal handlers not installed")
            return
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}

    @override
    def after_optimizer_step(self, trainer: L.Trainer) -> None:
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.requested = True
            self.stopped_at_step = trainer.global_step
            trainer.should_stop = True
            log.warning("preemption signal: stopping after optimizer step %d", trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
