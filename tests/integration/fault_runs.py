"""Steps shared by the stream fault tests' SQLite and Redis legs."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import lightning as L

from specforge_lightning.control.producer import read_stream_manifest
from specforge_lightning.data.ledger_stream import RankedLedgerStream
from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.manifest import RefCheck
from specforge_lightning.data.stores.spec import StoreSpec, build_store
from specforge_lightning.datamodules import StreamDataModule
from specforge_lightning.target.producer import ProducerConfig, run_producer
from tests.integration.conftest import run_script


def open_ranked_stream(ledger, cfg: ProducerConfig, store: StoreSpec | None = None, consumer: str = "trainer"):
    """The trainer's view of ``ledger``: its feature store, the ranked stream and a manually acking loader."""
    features = build_store(store or cfg.store, consume_once=False)
    stream = RankedLedgerStream(
        ledger, consumer, check=RefCheck(read_stream_manifest(cfg.ledger)), store=features, free_on_ack=True,
        poll_s=0.01,
    )
    loader = FeatureDataLoader(features, stream=stream, batch_size=2, ack_mode="manual", poll_timeout_s=0.05)
    return features, stream, loader


def kill_trainer_at_step_2_then_restart(cfg: ProducerConfig, tmp_path: Path, *, script: str, counts, ledger_cls,
                                        module_cls) -> tuple[list[str], L.LightningModule]:
    """The trainer ``script`` is SIGKILLed at step 2, before its ack; the same consumer then trains to the end.

    Returns what the killed run trained and the restarted module (its ``trained`` ids)."""
    run_producer(cfg)
    log = tmp_path / "trained.jsonl"
    hidden = read_stream_manifest(cfg.ledger)["hidden_size"]
    args = {"ledger": cfg.ledger, "store": dataclasses.asdict(cfg.store), "log": str(log), "hidden": hidden,
            "kill_at_step": 2}
    path = tmp_path / "trainer.py"
    path.write_text(script)
    out = run_script(path, json.dumps(args))
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    before = [sid for line in log.read_text().splitlines() for sid in json.loads(line)]
    assert len(before) == 4
    c = counts(cfg)
    assert c["acked"] == 4 and c["leased"] == 2  # step 2's batch died leased, never acked
    with ledger_cls(cfg.ledger) as ledger:
        assert set(ledger.leased_by("trainer-rank0")).isdisjoint(before)

    # Restart with the same consumer: its dead leases come back first, in publish order.
    module = module_cls(hidden)
    dm = StreamDataModule(source="ledger", batch_size=2, ledger=cfg.ledger, store=cfg.store)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=dm)  # no max_steps: stops when the stream ends
    assert set(module.trained).isdisjoint(before)  # nothing acked is trained again
    return before, module
