"""Plain fit progress lines for logs: the ``Trainer.fit`` side of ``runtime.progress``.

Why: Lightning's bars redraw in place; in a piped log a long fit shows nothing useful. This
callback prints ``fit: step 120/1000 (12%), 2.31 steps/s, ETA 06:21, train/loss 3.412`` at
least every ``interval_s`` when its stream is not a TTY, and nothing on a TTY (Lightning's bar).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

from lightning.pytorch.callbacks import Callback, Timer

from specforge_lightning.runtime.progress import Heartbeat, format_duration, format_rate, is_tty


INTERVAL_ENV = "SPECFORGE_PROGRESS_INTERVAL_S"


def interval_from_env(default: float = 30.0) -> float:
    """Seconds between plain fit lines: ``$SPECFORGE_PROGRESS_INTERVAL_S`` or ``default`` (tests set it small)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: give the seconds between progress lines, e.g. 30") from None
    if not value >= 0:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: must be >= 0")
    return value


class PlainProgressLogger(Callback):
    """Plain fit progress lines when stdout is not a TTY (a TTY keeps Lightning's bar).

    Prints on global rank 0 only, at least every ``interval_s`` seconds:
    ``fit: step 120/1000 (12%), 2.31 steps/s, ETA 06:21, train/loss 3.412``. The ETA is the
    sooner of the step limit and ``trainer.max_time``. Each step keeps a reference to the logged
    loss; it becomes a float only when a line is printed (a device sync every ``interval_s``,
    not every step).
    """

    def __init__(self, interval_s: float = 30.0, *, stream: TextIO | None = None, metric: str = "train/loss") -> None:
        self.interval_s = interval_s
        self.metric = metric
        self._stream = stream
        self._beat: Heartbeat | None = None
        self._trainer: Any = None
        self._start = 0.0
        self._start_step = 0
        self._loss: float | None = None
        self._loss_ref: Any = None
        self._total: float | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def _max_steps(self) -> float | None:
        t = self._trainer
        if t.max_steps is not None and t.max_steps > 0:
            return float(t.max_steps)
        try:
            est = float(t.estimated_stepping_batches)
        except Exception:  # no loader length (iterable streams): no step total, ETA from max_time only
            return None
        return est if math.isfinite(est) else None

    def _time_left(self) -> float | None:
        for cb in self._trainer.callbacks:
            if isinstance(cb, Timer):
                return cb.time_remaining()
        return None

    def line(self, *, final: bool = False) -> str:
        """The current fit line (also used by tests)."""
        t = self._trainer
        step = int(t.global_step)
        elapsed = time.monotonic() - self._start
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        total = self._total
        count = f"step {step}/{int(total)} ({100.0 * step / total:.0f}%)" if total else f"step {step}"
        if final:
            tail = f"done in {format_duration(elapsed)}"
        else:
            by_steps = (total - step) / rate if total and rate > 0 else None
            etas = [x for x in (by_steps, self._time_left()) if x is not None]
            tail = f"ETA {format_duration(min(etas)) if etas else '--:--'}"
        loss = f", {self.metric} {self._loss:.4g}" if self._loss is not None else ""
        return f"fit: {count}, {format_rate(rate)} steps/s, {tail}{loss}"

    def _read_loss(self) -> None:
        """Turn the last logged loss into a float (once per printed line, so rarely a device sync)."""
        value = self._loss_ref
        if value is not None:
            try:
                self._loss = float(value)
            except (TypeError, ValueError, RuntimeError):
                pass

    def _emit(self, final: bool = False) -> None:
        self._read_loss()
        print(self.line(final=final), file=self.stream, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or is_tty(self.stream):
            return
        self._trainer = trainer
        self._start = time.monotonic()
        self._start_step = int(trainer.global_step)  # a resumed run's rate counts this run's steps
        self._total = self._max_steps()  # here, not in the heartbeat thread: it may size the loaders
        self._beat = Heartbeat(self.interval_s, self._emit, time.monotonic)
        self._beat.now()
        self._beat.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._beat is None:
            return
        # A reference only (no sync); the float is taken when a line is printed.
        self._loss_ref = trainer.callback_metrics.get(self.metric)
        self._beat.due()

    def _finish(self, final: bool) -> None:
        if self._beat is None:
            return
        self._beat.stop()
        self._beat = None
        self._emit(final=final)

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(final=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish(final=False)
