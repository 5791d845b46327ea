"""StreamDataModule: train on features while they are being captured.

Two sources, one loader:

- ``source="colocated"``: the target runs in this process on a background thread
  (``ColocatedRefSource``); each rank captures its own ``DistributedSampler`` share.
- ``source="ledger"``: a separate producer (``python -m specforge_lightning produce``)
  puts features into a shared store (``store.kind``: ``shared_dir`` or ``mooncake``)
  and publishes refs to a SQLite ledger; this module waits for the producer's
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L

from specforge_lightning.contracts import FeatureContext, StrategySpec
from specforge_lightning.control.ledger import Ledger
from specforge_lightning.data.datamodule import CONFIG_FIELDS, SampleTransform
from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.online import (
    ColocatedRefSource,
    LocalComm,
    RankedLedgerStream,
    RefCheck,
    StoreSpec,
    TorchComm,
    build_store,
    capture_in_order,
)
from specforge_lightning.data.shards import read_shard_index, write_shard
from specforge_lightning.data.stores.base import FeatureStore
from specforge_lightning.data.stores.local import LocalFeatureStore, PreparedShardStore
from specforge_lightning.target.prepare import PrepareConfig, manifest_mismatch, read_manifest

log = logging.getLogger(__name__)
SOURCES = ("colocated", "ledger")


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
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "ledger" and not ledger:
            raise ValueError("source=ledger needs ledger=<path to the producer's ledger.sqlite>")
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
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _strategy_spec(self) -> StrategySpec | None:
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        return getattr(module, "strategy_spec", None)

    def _context(self, manifest: dict[str, Any], vocab_path: Path) -> FeatureContext:
        from specforge_lightning.target.zoo import resolve_target

        return FeatureContext(
            target_dir=str(resolve_target(manifest["target"], self.prepare_cfg.cache_dir)),
            target_id=manifest["target"],
            layer_ids=tuple(manifest["layer_ids"]),
            hidden_size=manifest["hidden_size"],
            vocab_size=manifest["vocab_size"],
            draft_vocab_size=manifest["draft_vocab_size"],
            vocab_mapping_path=str(vocab_path),
            capture_dtype=manifest["capture_dtype"],
            max_length=manifest["max_length"],
            manifest=manifest,
        )

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
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not any(isinstance(c, StreamAck) for c in trainer.callbacks):
            trainer.callbacks.insert(0, StreamAck(self))

    def _setup_colocated(self, rank: int, world: int, spec: StrategySpec | None) -> None:
        from specforge_lightning.data.vocab import save_vocab_mapping
        from specforge_lightning.target.prepare import VOCAB_FILE
        from specforge_lightning.target.producer import plan_stream

        plan = plan_stream(self.prepare_cfg)
        manifest = dict(plan.manifest)
        save_dir = Path(self.save_dir) if self.save_dir else None
        if save_dir is not None:
            existing = read_manifest(save_dir)
            if existing is not None:
                diff = manifest_mismatch(existing, manifest)
                if diff:
                    raise ValueError(f"{save_dir} holds features captured differently ({diff}); pick another save_dir")
                if existing.get("complete"):
                    log.warning("%s already holds these features: FeatureDataModule can train on them offline", save_dir)
                    save_dir = None
        if save_dir is not None and (world > 1 or self.shuffle):
            log.warning("save_dir is ignored with %d ranks / shuffle=%s: shards must hold every task in order", world, self.shuffle)
            save_dir = None
        if save_dir is not None:
            work = save_dir
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="specforge-colocated-")
            work = Path(self._tmp.name)
        work.mkdir(parents=True, exist_ok=True)
        save_vocab_mapping(work / VOCAB_FILE, plan.d2t, plan.t2d)
        self.manifest = manifest
        self.feature_context = self._context(manifest, work / VOCAB_FILE)
        engine = plan.load_engine()
        manifest["splits"] = {}
        if plan.val:
            self._val = self._capture_val(engine, plan, save_dir, manifest)
        self.colocated = ColocatedRefSource(
            engine,
            plan.train,
            plan.layer_ids,
            batch_size=self.prepare_cfg.batch_size,
            chunk_size=self.prepare_cfg.shard_size,
            provenance=plan.provenance(),
            high_watermark=self.high_watermark,
            low_watermark=self.low_watermark,
            max_resident_bytes=self.max_resident_bytes,
            epochs=self.epochs,
            shuffle=self.shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            save_dir=save_dir,
            manifest=manifest,
            check=RefCheck(manifest, spec.features if spec else None),
        )
        self.stream, self.store, self.ledger = self.colocated.stream, self.colocated.store, self.colocated.ledger

    def _capture_val(self, engine: Any, plan: Any, save_dir: Path | None, manifest: dict[str, Any]) -> tuple:
        """Validation features, captured once up front into a retained store (and saved as val shards)."""
        cfg = plan.cfg
        store = LocalFeatureStore()
        refs, chunk, shards = [], [], []
        for pos, feats in capture_in_order(engine, plan.val, plan.layer_ids, chunk_size=cfg.shard_size, batch_size=cfg.batch_size):
            task = plan.val[pos]
            if feats is not None:
                refs.append(store.put(feats, task.task_id))
                chunk.append((task.task_id, feats))
            if save_dir is not None and (pos % cfg.shard_size == cfg.shard_size - 1 or pos == len(plan.val) - 1):
                if chunk:
                    rel = f"val/shard_{pos // cfg.shard_size:05d}.safetensors"
                    write_shard(save_dir / rel, chunk, {"split": "val", "target": cfg.target})
                    shards.append(rel)
                chunk = []
        manifest["splits"]["val"] = {
            "shards": shards,
            "num_samples": len(plan.val),
            "num_tokens": sum(t.num_tokens for t in plan.val),
            "num_supervised": sum(t.num_supervised for t in plan.val),
        }
        return store, refs

    def _setup_ledger(self, rank: int, world: int, spec: StrategySpec | None) -> None:
        from specforge_lightning.control.producer import stream_file, wait_stream_manifest
        from specforge_lightning.control.sqlite_ledger import SqliteLedger

        assert self.ledger_path is not None
        manifest = wait_stream_manifest(self.ledger_path, self.manifest_timeout_s)
        if self.prepare_given:
            wanted = {k: v for k, v in asdict(self.prepare_cfg).items() if k in CONFIG_FIELDS}
            if self.prepare_cfg.layer_ids:
                wanted["layer_ids"] = list(self.prepare_cfg.layer_ids)
            diff = manifest_mismatch(manifest, wanted, CONFIG_FIELDS + ("layer_ids",))
            if diff:
                raise ValueError(f"the stream on {self.ledger_path} does not match this run ({diff})")
        announced = manifest.get("stream", {})
        mine = {"epochs": self.epochs, "shuffle": self.shuffle, "seed": self.seed}
        if any(announced.get(k, v) != v for k, v in mine.items()):
            log.warning("the producer streams %s; this config says %s (the producer's choice wins)", announced, mine)
        self.manifest = manifest
        self.feature_context = self._context(manifest, stream_file(self.ledger_path, manifest["vocab_mapping"]))
        comm = TorchComm() if world > 1 else LocalComm()
        self.ledger = SqliteLedger(self.ledger_path)
        self.store = build_store(self.store_spec, consume_once=False)
        self.stream = RankedLedgerStream(
            self.ledger,
            self.consumer,
            comm=comm,
            lease_s=self.lease_s,
            check=RefCheck(manifest, spec.features if spec else None),
            store=self.store,
            free_on_ack=True,
        )
        if self.val_dir:
            val_manifest = read_manifest(self.val_dir)
            if val_manifest is None or "val" not in val_manifest.get("splits", {}):
                raise FileNotFoundError(f"val_dir {self.val_dir} holds no prepared val split (manifest.json)")
            val_store = PreparedShardStore(self.val_dir)
            refs = [r for rel in val_manifest["splits"]["val"]["shards"] for r in read_shard_index(Path(self.val_dir) / rel)]
            self._val = (val_store, refs)

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
            from specforge_lightning.control.producer import ProducerProgress

            assert self.ledger_path is not None
            out["producer_samples_per_s"] = float(ProducerProgress(self.ledger_path).read_info().get("samples_per_s", 0.0))
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
