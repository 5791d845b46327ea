"""StreamDataModule: train on features while they are being captured.

Two sources, one loader:

- ``source="colocated"``: the target runs in this process on a background thread
  (``ColocatedRefSource``); each rank captures its own ``DistributedSampler`` share.
- ``source="ledger"``: a separate producer (``python -m specforge_lightning produce``)
  puts features into a shared store (``store.kind``: ``shared_dir`` or ``mooncake``)
  and publishes refs to a ledger (a SQLite file, or Redis for several hosts); this module waits for the producer's
  ``stream_manifest.json`` and leases refs in lockstep across ranks.

Either way batches come from a stream-mode ``FeatureDataLoader`` in manual ack mode.
:class:`StreamAck` (installed automatically) commits the trained refs at every
optimizer step, before checkpoint callbacks run: an acked sample is never replayed,
an unacked one comes back after a crash (leases are returned on restart).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import lightning as L

from specforge_lightning.contracts import FeatureContext, StrategySpec
from specforge_lightning.control.ledger import Ledger
from specforge_lightning.data.ledger_stream import RankedLedgerStream
from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.stores.base import FeatureStore
from specforge_lightning.data.stores.spec import StoreSpec
from specforge_lightning.datamodules.checks import trainer_rank, trainer_strategy_spec
from specforge_lightning.datamodules.colocated import open_colocated
from specforge_lightning.datamodules.ledger import open_ledger, producer_rate
from specforge_lightning.datamodules.transform import SampleTransform
from specforge_lightning.errors import UserError
from specforge_lightning.target.colocated import ColocatedRefSource
from specforge_lightning.target.prepare import PrepareConfig

log = logging.getLogger(__name__)
SOURCES = ("colocated", "ledger")


class StreamConfigError(UserError, ValueError):
    """The StreamDataModule's own arguments do not make a stream (unknown source, no ledger)."""


class StreamAck(L.Callback):
    """Commits trained refs at optimizer boundaries (inserted first, so before any checkpoint is written)."""

    def __init__(self, datamodule: StreamDataModule) -> None:
        self.datamodule = datamodule
        self._trained: list[str] = []
        self._step_before = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._trained.extend(getattr(batch, "sample_ids", ()))
        self._trained.extend(getattr(batch, "metadata", {}).get("skipped", ()))
        if trainer.global_step > self._step_before:  # the optimizer stepped on this batch
            self.datamodule.commit(self._trained)
            self._trained = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.datamodule.stream_exhausted():
            trainer.should_stop = True


class StreamDataModule(L.LightningDataModule):
    """Online features from a colocated target or a disaggregated producer.

    Args:
        source: ``colocated`` or ``ledger``.
        prepare: what to capture (colocated) or what the run expects (ledger: checked
            against the producer's manifest, field by field).
        batch_size, max_length, prefetch, poll_timeout_s: the loader (prefetch is 0 on several ranks
            of a ledger stream: ranks lease in lockstep on the main thread).
        epochs, shuffle, seed: passes over the conversations (colocated; a producer reads the same keys).
        high_watermark, low_watermark: the colocated capture thread pauses at ``high`` queued refs.
        max_resident_bytes: memory cap of the colocated store.
        save_dir: colocated, one rank, no shuffle: also write prepared shards + manifest there.
        ledger, store, consumer, lease_s, manifest_timeout_s: the disaggregated stream.
        val_dir: ledger mode: a prepared features folder whose ``val`` split validates.
    """

    def __init__(
        self,
        source: str = "colocated",
        prepare: PrepareConfig | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        max_length: int | None = None,
        prefetch: int = 1,
        poll_timeout_s: float = 1.0,
        epochs: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        high_watermark: int = 64,
        low_watermark: int = 32,
        max_resident_bytes: int | None = None,
        save_dir: str | None = None,
        ledger: str | None = None,
        store: StoreSpec | None = None,
        consumer: str = "trainer",
        lease_s: float = 3600.0,
        manifest_timeout_s: float = 600.0,
        val_dir: str | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise StreamConfigError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "ledger" and not ledger:
            raise StreamConfigError(
                "source=ledger needs ledger=<the producer's ledger.sqlite path, or redis://HOST:PORT/DB?stream=NAME>"
            )
        self.source = source
        self.prepare_cfg = prepare or PrepareConfig()
        self.prepare_given = prepare is not None
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_length = max_length
        self.prefetch = prefetch
        self.poll_timeout_s = poll_timeout_s
        self.epochs = epochs
        self.shuffle = shuffle
        self.seed = seed
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.max_resident_bytes = max_resident_bytes
        self.save_dir = save_dir
        self.ledger_path = ledger
        self.store_spec = store or StoreSpec()
        self.consumer = consumer
        self.lease_s = lease_s
        self.manifest_timeout_s = manifest_timeout_s
        self.val_dir = val_dir
        self.feature_context: FeatureContext | None = None
        self.manifest: dict[str, Any] | None = None
        self.colocated: ColocatedRefSource | None = None
        self.stream: RankedLedgerStream | None = None
        self.store: FeatureStore | None = None
        self.ledger: Ledger | None = None
        self.loader: FeatureDataLoader | None = None
        self.last_commit_s = 0.0
        self._val: tuple[FeatureStore, list] | None = None
        self._ready = False
        self._tmp: tempfile.TemporaryDirectory | None = None

    # ------------------------------------------------------------------ helpers

    def _rank(self) -> tuple[int, int]:
        return trainer_rank(self.trainer)

    def _strategy_spec(self) -> StrategySpec | None:
        return trainer_strategy_spec(self.trainer)

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        rank, world = self._rank()
        spec = self._strategy_spec()
        if self.source == "colocated":
            self._setup_colocated(rank, world, spec)
        else:
            self._setup_ledger(rank, world, spec)
        self._ready = True
        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, StreamAck) for c in trainer.callbacks):
            trainer.callbacks.insert(0, StreamAck(self))

    def _setup_colocated(self, rank: int, world: int, spec: StrategySpec | None) -> None:
        setup = open_colocated(
            self.prepare_cfg,
            spec,
            rank=rank,
            world=world,
            save_dir=self.save_dir,
            epochs=self.epochs,
            shuffle=self.shuffle,
            seed=self.seed,
            high_watermark=self.high_watermark,
            low_watermark=self.low_watermark,
            max_resident_bytes=self.max_resident_bytes,
        )
        self.manifest, self.feature_context, self._tmp = setup.manifest, setup.context, setup.tmp
        self._val = setup.val
        self.colocated = setup.source
        self.stream, self.store, self.ledger = self.colocated.stream, self.colocated.store, self.colocated.ledger

    def _setup_ledger(self, rank: int, world: int, spec: StrategySpec | None) -> None:
        assert self.ledger_path is not None
        setup = open_ledger(
            self.ledger_path,
            self.prepare_cfg,
            spec,
            check_config=self.prepare_given,
            store_spec=self.store_spec,
            consumer=self.consumer,
            lease_s=self.lease_s,
            manifest_timeout_s=self.manifest_timeout_s,
            val_dir=self.val_dir,
            epochs=self.epochs,
            shuffle=self.shuffle,
            seed=self.seed,
            world=world,
        )
        self.manifest, self.feature_context, self._val = setup.manifest, setup.context, setup.val
        self.stream, self.store, self.ledger = setup.stream, setup.store, setup.ledger

    # ------------------------------------------------------------------ loaders

    def train_dataloader(self) -> FeatureDataLoader:
        assert self.stream is not None and self.store is not None, "call setup() first"
        rank, world = self._rank()
        spec = self._strategy_spec()
        prefetch = self.prefetch
        if self.source == "ledger" and world > 1 and prefetch:
            log.info("prefetch=%d ignored: %d ranks lease in lockstep on the main thread", prefetch, world)
            prefetch = 0
        self.loader = FeatureDataLoader(
            self.store,
            stream=self.stream,
            batch_size=self.batch_size,
            transform=SampleTransform(spec, self.max_length),
            shuffle=False,
            rank=rank,
            world_size=world,
            drop_last=True,
            prefetch=prefetch,
            strategy=spec.name if spec else "",
            ack_mode="manual",
            poll_timeout_s=self.poll_timeout_s,
        )
        if self.colocated is not None:
            self.colocated.start()
        return self.loader

    def val_dataloader(self) -> FeatureDataLoader | list:
        if self._val is None or not self._val[1]:
            return []
        store, refs = self._val
        rank, world = self._rank()
        spec = self._strategy_spec()
        return FeatureDataLoader(
            store,
            refs=refs,
            batch_size=self.val_batch_size,
            transform=SampleTransform(spec, self.max_length),
            shuffle=False,
            rank=rank,
            world_size=world,
            drop_last=False,
            prefetch=0,
            strategy=spec.name if spec else "",
        )

    # ------------------------------------------------------------------ acks and health

    def commit(self, trained_ids: Sequence[str]) -> int:
        """Durably ack what was trained (collective across ranks); called by StreamAck."""
        if self.loader is None or self.stream is None:
            return 0
        t0 = time.perf_counter()
        self.loader.ack_pending()
        n = self.stream.commit(trained_ids)
        self.last_commit_s = time.perf_counter() - t0
        return n

    def stream_exhausted(self) -> bool:
        return self.stream is not None and self.stream.exhausted()

    def stream_health(self) -> dict[str, float]:
        """Queue depth, ledger counts, producer rate and this rank's held/committed refs."""
        if self.ledger is None or self.stream is None:
            return {}
        counts = self.ledger.counts()
        out: dict[str, float] = {
            "queue_depth": counts["queued"],
            "published": counts["published"],
            "leased": counts["leased"],
            "acked": counts["acked"],
            "failed": counts["failed"],
            "ack_s": self.last_commit_s,
            **{f"rank_{k}": v for k, v in self.stream.health().items()},
        }
        if self.colocated is not None:
            out["producer_samples_per_s"] = self.colocated.health()["producer_samples_per_s"]
        else:  # the producer runs elsewhere: it records its own rate next to the ledger
            assert self.ledger_path is not None
            out["producer_samples_per_s"] = producer_rate(self.ledger_path)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The stream position lives in the ledger; this records only what was committed, for the record."""
        return {"source": self.source, "committed": self.stream.committed if self.stream else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: unacked refs come back through the ledger when the stream reopens."""

    def teardown(self, stage: str | None = None) -> None:
        if stage not in (None, "fit"):
            return
        if self.colocated is not None:
            self.colocated.stop()
        elif self.stream is not None:
            returned = self.stream.close()
            if returned:
                log.info("returned %d unacked refs to the ledger", returned)
        if self.source == "ledger":
            if self.ledger is not None:
                self.ledger.close()
            if self.store is not None:
                self.store.close()
        self._ready = False  # (a temporary vocab folder of a colocated run lives until the process exits)
        self.colocated = self.stream = self.store = self.ledger = self.loader = None
