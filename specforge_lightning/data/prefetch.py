"""The loader's prefetch thread: batches materialised ahead of the training step, handed over in order."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from specforge_lightning.contracts import SampleRef, TrainBatch

log = logging.getLogger(__name__)


@dataclass
class Work:
    """One materialised batch (None if every sample was skipped) and the refs it used."""

    batch: TrainBatch | None
    refs: list[SampleRef]


class Prefetcher:
    """Runs a batch source on a thread, up to ``depth`` batches ahead, yielding in order.

    An error on the thread is re-raised to the consumer; ``close`` stops the
    thread, joins it, and hands every batch that was never yielded to ``on_drop``.

    The thread runs its torch ops on one intra-op thread: it only reads and collates
    (a few ms a batch), and with the default pool it would start a second OpenMP team
    whose spinning threads take the cores from the training step's matmuls (a
    quickstart step on 2 cores: ~300 ms with a 2-thread prefetcher, ~255 ms with this).
    """

    def __init__(
        self,
        source_fn: Callable[[threading.Event], Iterator[Work]],
        depth: int,
        on_drop: Callable[[Work], None] | None,
    ) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._on_drop = on_drop
        # PyTorch sizes a thread's pool once, from the last value any thread set: settle the
        # consumer's before the worker narrows its own to one (see _run).
        torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, args=(source_fn,), name="feature-prefetch", daemon=True)
        self._thread.start()

    def _offer(self, msg: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(msg, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _drop(self, work: Work) -> None:
        if self._on_drop is not None:
            try:
                self._on_drop(work)
            except Exception:  # shutting down: report, do not mask the caller's exit
                log.exception("failed to hand back a prefetched batch")

    def _run(self, source_fn: Callable[[threading.Event], Iterator[Work]]) -> None:
        torch.set_num_threads(1)  # this thread's pool only; the consumer keeps its own
        source = None
        try:
            source = source_fn(self._stop)
            for work in source:
                if not self._offer(("work", work)):
                    self._drop(work)
                    return
            self._offer(("end", None))
        except BaseException as e:  # noqa: BLE001 - every failure must reach the consumer
            self._offer(("error", e))
        finally:
            if source is not None:
                try:
                    source.close()
                except Exception as e:
                    self._offer(("error", e))

    def __iter__(self) -> Iterator[Work]:
        while True:
            kind, value = self._queue.get()
            if kind == "work":
                yield value
            elif kind == "end":
                return
            else:
                raise value

    def close(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("prefetch thread did not stop within %.0f s", timeout_s)
        while True:
            try:
                kind, value = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "work":
                self._drop(value)
