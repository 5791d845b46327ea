"""Ledger set-up of a StreamDataModule: join a disaggregated producer's stream.

Waits for the producer's ``stream_manifest.json``, checks it against this run,
opens the shared store and the ledger (SQLite or Redis), and builds this rank's stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specforge_lightning.contracts import FeatureContext, SampleRef, StrategySpec
from specforge_lightning.control.producer import ProducerProgress, stream_file, wait_stream_manifest
from specforge_lightning.control.ledger import Ledger
from specforge_lightning.control.ledger_uri import open_ledger as open_ledger_store
from specforge_lightning.data.ledger_stream import LocalComm, RankedLedgerStream, TorchComm
from specforge_lightning.data.manifest import MissingFeaturesError, RefCheck, feature_context, read_manifest
from specforge_lightning.data.stores.shards import read_shard_index
from specforge_lightning.data.stores.base import FeatureStore
from specforge_lightning.data.stores.local import PreparedShardStore
from specforge_lightning.data.stores.spec import StoreSpec, build_store
from specforge_lightning.data.vocab import check_vocab_file
from specforge_lightning.datamodules.checks import check_run
from specforge_lightning.target.prepare import PrepareConfig
from specforge_lightning.target.zoo import resolve_target

log = logging.getLogger(__name__)
TARGET_FIX = "restart the producer with this target on a fresh ledger folder (or restore the target's files)"


@dataclass
class LedgerSetup:
    """What a ledger StreamDataModule holds once set up."""

    stream: RankedLedgerStream
    store: FeatureStore
    ledger: Ledger
    manifest: dict[str, Any]
    context: FeatureContext
    val: tuple[FeatureStore, list[SampleRef]] | None


def open_ledger(
    ledger_path: str,
    cfg: PrepareConfig,
    spec: StrategySpec | None,
    *,
    check_config: bool,
    store_spec: StoreSpec,
    consumer: str,
    lease_s: float,
    manifest_timeout_s: float,
    val_dir: str | None,
    epochs: int,
    shuffle: bool,
    seed: int,
    world: int,
) -> LedgerSetup:
    """Join the stream on ``ledger_path``; ``check_config``: compare ``cfg`` with the producer's manifest too."""
    manifest = wait_stream_manifest(ledger_path, manifest_timeout_s)
    target_dir = resolve_target(manifest["target"], cfg.cache_dir)
    where = f"the features of the stream on {ledger_path}"
    check_run(manifest, cfg if check_config else None, spec, where, target_dir, TARGET_FIX)
    announced = manifest.get("stream", {})
    mine = {"epochs": epochs, "shuffle": shuffle, "seed": seed}
    if any(announced.get(k, v) != v for k, v in mine.items()):
        log.warning("the producer streams %s; this config says %s (the producer's choice wins)", announced, mine)
    vocab_file = stream_file(ledger_path, manifest["vocab_mapping"])
    check_vocab_file(vocab_file, fix="the producer writes it: restart the producer on this ledger")
    context = feature_context(manifest, vocab_file.parent, target_dir)
    comm = TorchComm() if world > 1 else LocalComm()
    ledger = open_ledger_store(ledger_path)  # SQLite path or redis:// URI
    store = build_store(store_spec, consume_once=False)
    stream = RankedLedgerStream(
        ledger,
        consumer,
        comm=comm,
        lease_s=lease_s,
        check=RefCheck(manifest, spec.features if spec else None),
        store=store,
        free_on_ack=True,
    )
    return LedgerSetup(stream, store, ledger, manifest, context, _prepared_val(val_dir) if val_dir else None)


def _prepared_val(val_dir: str) -> tuple[FeatureStore, list[SampleRef]]:
    """The ``val`` split of a prepared features folder."""
    val_manifest = read_manifest(val_dir)
    if val_manifest is None or "val" not in val_manifest.get("splits", {}):
        raise MissingFeaturesError(f"val_dir {val_dir} holds no prepared val split (manifest.json)")
    refs = [r for rel in val_manifest["splits"]["val"]["shards"] for r in read_shard_index(Path(val_dir) / rel)]
    return PreparedShardStore(val_dir), refs


def producer_rate(ledger_path: str) -> float:
    """Samples per second the producer (elsewhere) records next to the ledger."""
    return float(ProducerProgress(ledger_path).read_info().get("samples_per_s", 0.0))
