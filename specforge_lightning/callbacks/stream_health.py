"""StreamHealth: is the trainer waiting for data, and is the producer keeping up?

Logs, per step: ``stream/data_wait_s`` (time between the end of one training batch
and the start of the next, or from ``on_fit_start`` to the first batch: what the loop
spent getting data; Lightning fetches one batch ahead, so a wait shows one step early) and
``stream/data_wait_fraction`` (cumulative wait over cumulative wall time). Every
``log_every_n_steps`` it adds what the datamodule reports through
``stream_health()`` (StreamDataModule: queue depth, published / leased / acked /
failed counts, producer samples/s, the last ack's duration). Works with any
datamodule; without ``stream_health`` only the wait is logged.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class StreamHealth(L.Callback):
    def __init__(self, log_every_n_steps: int = 1, prefix: str = "stream/") -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.wait_s = 0.0
        self.steps = 0
        self.last: dict[str, float] = {}
        self._start: float | None = None
        self._mark: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning fetches the first batch before on_train_start: the clock starts here to see that wait.
        self._start = self._mark = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            self._start = self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        wait = now - (self._mark if self._mark is not None else now)
        self.wait_s += wait
        self.steps += 1
        self._log(pl_module, {"data_wait_s": wait})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        values = {"data_wait_fraction": self.wait_fraction()}
        if self.steps % self.log_every_n_steps == 0:
            health = getattr(trainer.datamodule, "stream_health", None) if trainer.datamodule is not None else None
            if callable(health):
                values.update({k: float(v) for k, v in health().items() if isinstance(v, (int, float))})
        self._log(pl_module, values)
        self._mark = time.perf_counter()

    def wait_fraction(self) -> float:
        if self._start is None:
            return 0.0
        elapsed = time.perf_counter() - self._start
        return self.wait_s / elapsed if elapsed > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """Totals for a report: steps, data wait, its fraction of the wall time, the last health values."""
        return {**self.last, "steps": self.steps, "data_wait_s": self.wait_s, "data_wait_fraction": self.wait_fraction()}

    def _log(self, pl_module: L.LightningModule, values: dict[str, float]) -> None:
        self.last.update(values)
        for name, value in values.items():
            pl_module.log(self.prefix + name, float(value), on_step=True, on_epoch=False, batch_size=1)
