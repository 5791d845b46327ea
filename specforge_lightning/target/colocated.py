"""Colocated online training: the target captures on a background thread of the trainer's process.

:class:`ColocatedRefSource` fills a consume-once LocalFeatureStore and an in-memory
ledger and exposes a RefStream; it can also save what it captured as prepared
shards ("generate once, reuse").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.contracts import PromptTask, SampleRef
from specforge_lightning.control.ledger import Backpressure, InMemoryLedger
from specforge_lightning.data.ledger_stream import RankedLedgerStream
from specforge_lightning.data.loader import distributed_indices
from specforge_lightning.data.manifest import write_manifest
from specforge_lightning.data.stores.shards import write_shard
from specforge_lightning.data.stores.local import LocalFeatureStore
from specforge_lightning.data.stores.spec import put_with_retry
from specforge_lightning.target.capture import capture_in_order, epoch_sample_ids
from specforge_lightning.target.engine import TargetEngine

log = logging.getLogger(__name__)


class ColocatedRefSource:
    """The target runs in this process, on a background thread, never in the training step.

    Captured samples go into a consume-once LocalFeatureStore and their refs into an
    in-memory ledger; ``stream`` is the RefStream for ``FeatureDataLoader(stream=...)``.
    The thread pauses while ``high_watermark`` refs are queued (until fewer than
    ``low_watermark``) and while the store is over ``max_resident_bytes``.

    Rank ``rank`` of ``world_size`` captures the tasks ``DistributedSampler`` would give
    it (``shuffle``/``seed`` per epoch). With one rank and no shuffle the batching equals
    prepare's, so the features are bit-identical to prepared shards. ``save_dir`` (one
    rank, no shuffle) also writes epoch 0 as prepared shards plus ``manifest.json``
    (``manifest`` supplies the identity fields), so a later run can train offline on it.
    """

    def __init__(
        self,
        engine: TargetEngine,
        tasks: Sequence[PromptTask],
        layer_ids: Sequence[int],
        *,
        batch_size: int = 8,
        chunk_size: int = 64,
        strategy: str = "",
        provenance: Mapping[str, Any] | None = None,
        high_watermark: int = 32,
        low_watermark: int = 16,
        max_resident_bytes: int | None = None,
        epochs: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        save_dir: str | Path | None = None,
        manifest: Mapping[str, Any] | None = None,
        check: Callable[[SampleRef], None] | None = None,
    ) -> None:
        if save_dir is not None and (world_size != 1 or shuffle):
            raise ValueError("save_dir needs one rank without shuffle (the shards must hold every task in order)")
        if save_dir is not None and manifest is None:
            raise ValueError("save_dir needs the manifest identity fields (manifest=...)")
        self.engine = engine
        self.tasks = list(tasks)
        self.layer_ids = list(layer_ids)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.strategy = strategy
        self.provenance = dict(provenance or {})
        self.epochs = epochs
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.manifest = dict(manifest or {})
        self.store = LocalFeatureStore(max_resident_bytes=max_resident_bytes, consume_once=True)
        self.ledger = InMemoryLedger()
        self.backpressure = Backpressure(self.ledger, high_watermark, low_watermark, poll_s=0.01)
        self.stream = RankedLedgerStream(
            self.ledger, "colocated", store=self.store, check=check, producer_error=lambda: self.error
        )
        self.error: BaseException | None = None
        self.published = 0
        self.nan_skipped = 0
        self.capture_s = 0.0
        self.paused_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = 0.0

    def start(self) -> ColocatedRefSource:
        if self._thread is None:
            self._started_at = time.monotonic()
            # The capture thread's intra-op pool matches the caller's, whatever other threads
            # (a loader's prefetcher runs on one) set before it starts.
            threads = torch.get_num_threads()
            self._thread = threading.Thread(
                target=self._run, args=(threads,), name="colocated-capture", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("colocated capture thread did not stop within %.0f s", timeout_s)
        close = getattr(self.engine, "close", None)  # an SGLang engine stops the server it launched
        if callable(close) and not (self._thread is not None and self._thread.is_alive()):
            close()
        self.stream.close()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def health(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._started_at if self._started_at else 0.0
        return {
            **self.ledger.counts(),
            "queue_depth": self.ledger.depth(),
            "producer_samples_per_s": self.published / elapsed if elapsed > 0 else 0.0,
            "producer_paused_s": self.paused_s,
            "producer_capture_s": self.capture_s,
            "nan_skipped": self.nan_skipped,
            "resident_bytes": self.store.health()["resident_bytes"],
        }

    # -- the capture thread -------------------------------------------------------------

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            if self.save_dir is not None:
                self._begin_save()
            for epoch in range(self.epochs):
                order = distributed_indices(
                    len(self.tasks), self.world_size, self.rank, self.seed, epoch, self.shuffle
                )
                ordered = [self.tasks[i] for i in order]
                ids = epoch_sample_ids(self.tasks, order, epoch)
                saving = self.save_dir is not None and epoch == 0
                self._capture_epoch(ordered, ids, saving)
                if self._stop.is_set():
                    return
            if self.save_dir is not None:
                self._finish_save()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer through the stream
            if not isinstance(e, InterruptedError):
                log.exception("colocated capture failed")
                self.error = e
        finally:
            self.ledger.mark_done()

    def _capture_epoch(self, ordered: list[PromptTask], ids: list[str], saving: bool) -> None:
        pending: list[tuple[str, dict[str, torch.Tensor]]] = []
        t0 = time.monotonic()
        for pos, feats in capture_in_order(
            self.engine, ordered, self.layer_ids, chunk_size=self.chunk_size, batch_size=self.batch_size,
            stop=self._stop,
        ):
            self.capture_s += time.monotonic() - t0
            if feats is None:
                self.nan_skipped += 1
            else:
                if saving:
                    pending.append((ordered[pos].task_id, feats))
                self._publish(ids[pos], feats)
            if saving and (pos % self.chunk_size == self.chunk_size - 1 or pos == len(ordered) - 1):
                self._save_shard(pos // self.chunk_size, pending)
                pending = []
            if self._stop.is_set():
                return
            t0 = time.monotonic()

    def _publish(self, sample_id: str, feats: dict[str, torch.Tensor]) -> None:
        t0 = time.monotonic()
        while not self.backpressure.wait_below(timeout=0.2):
            if self._stop.is_set():
                raise InterruptedError("stopped")
        ref = put_with_retry(
            self.store, feats, sample_id, strategy=self.strategy, provenance=self.provenance,
            should_stop=self._stop.is_set,
        )
        self.paused_s += time.monotonic() - t0
        self.ledger.publish([ref])
        self.published += 1

    # -- generate once, reuse ------------------------------------------------------------

    def _begin_save(self) -> None:
        assert self.save_dir is not None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.manifest.setdefault("splits", {})
        self.manifest["complete"] = False
        self._train_shards: list[str] = []
        write_manifest(self.save_dir, self.manifest)

    def _save_shard(self, index: int, samples: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
        assert self.save_dir is not None
        if not samples:  # every sample of the chunk had a NaN
            return
        rel = f"train/shard_{index:05d}.safetensors"
        write_shard(self.save_dir / rel, samples, {"split": "train", "target": str(self.manifest.get("target", ""))})
        self._train_shards.append(rel)

    def _finish_save(self) -> None:
        assert self.save_dir is not None
        self.manifest["splits"]["train"] = {
            "shards": self._train_shards,
            "num_samples": len(self.tasks),
            "num_tokens": sum(t.num_tokens for t in self.tasks),
            "num_supervised": sum(t.num_supervised for t in self.tasks),
        }
        self.manifest["nan_skipped"] = self.manifest.get("nan_skipped", 0) + self.nan_skipped
        self.manifest["complete"] = True
        write_manifest(self.save_dir, self.manifest)
        log.info("saved the captured features as prepared shards in %s", self.save_dir)
