"""Fault injection on the disaggregated stream: every fault ends in recovery or a clear error,
nothing is lost and nothing is trained twice."""

from __future__ import annotations

import dataclasses
import json
import signal
import sqlite3
import textwrap
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from specforge_lightning.contracts import StrategySpec
from specforge_lightning.control.producer import PROGRESS, ProducerProgress, read_stream_manifest, stream_file
from specforge_lightning.control.sqlite_ledger import SqliteLedger
from specforge_lightning.data.manifest import StreamSchemaError
from specforge_lightning.data.stores.base import FeatureStoreError
from specforge_lightning.data.stores.spec import StoreSpec, build_store
from specforge_lightning.datamodules import StreamDataModule
from specforge_lightning.target.producer import ProducerConfig, run_producer
from tests.integration.conftest import prepare_dict, run_script, tiny_prepare
from tests.integration.fault_runs import kill_trainer_at_step_2_then_restart, open_ranked_stream

pytestmark = pytest.mark.slow
N = 6


def producer_cfg(tmp_path: Path, **store_kw) -> ProducerConfig:
    store = StoreSpec(kind="shared_dir", root=str(tmp_path / "store"), **store_kw)
    cfg = tiny_prepare(num_samples=N, shard_size=2, batch_size=2)
    return ProducerConfig(prepare=cfg, ledger=str(tmp_path / "stream" / "ledger.sqlite"), store=store)


def counts(cfg: ProducerConfig) -> dict[str, int]:
    with SqliteLedger(cfg.ledger) as ledger:
        return ledger.counts()


def open_stream(cfg: ProducerConfig, store: StoreSpec | None = None, consumer: str = "trainer"):
    ledger = SqliteLedger(cfg.ledger)
    features, stream, loader = open_ranked_stream(ledger, cfg, store, consumer)
    return ledger, features, stream, loader


def consume(cfg: ProducerConfig, store: StoreSpec | None = None, consumer: str = "trainer") -> list[str]:
    """Train-free consumer: every batch is committed right after it is seen (one optimizer step per batch)."""
    ledger, features, stream, loader = open_stream(cfg, store, consumer)
    seen: list[str] = []
    try:
        for batch in loader:
            seen += batch.sample_ids
            loader.ack_pending()
            stream.commit(batch.sample_ids)
    finally:
        stream.close()
        ledger.close()
        features.close()
    return seen


def published_ids(cfg: ProducerConfig) -> list[str]:
    """Every sample id the ledger ever received, in publish order."""
    with sqlite3.connect(cfg.ledger) as db:
        return [row[0] for row in db.execute("SELECT sample_id FROM refs ORDER BY seq")]


# ----------------------------------------------------------------- the producer dies


KILLED_PRODUCER = textwrap.dedent(
    """
    import json, os, signal, sys
    from specforge_lightning.data.stores import shards
    from specforge_lightning.data.stores.spec import StoreSpec
    from specforge_lightning.target.prepare import PrepareConfig
    from specforge_lightning.target.producer import ProducerConfig, run_producer

    args = json.loads(sys.argv[1])
    real_save, calls = shards.save_file, [0]

    def dying_save(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == args["kill_at"]:  # half of a sample file is on disk, then the process dies
            with open(path, "wb") as f:
                f.write(b"\\x00" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(tensors, path, metadata=metadata)

    shards.save_file = dying_save
    run_producer(ProducerConfig(prepare=PrepareConfig(**args["prepare"]), ledger=args["ledger"],
                                store=StoreSpec(**args["store"])))
    """
)


@pytest.mark.multiprocess
def test_producer_killed_in_the_middle_of_a_put_recovers_without_loss(tmp_path):
    cfg = producer_cfg(tmp_path)
    script = tmp_path / "producer.py"
    script.write_text(KILLED_PRODUCER)
    args = {"prepare": prepare_dict(cfg.prepare), "ledger": cfg.ledger, "store": dataclasses.asdict(cfg.store), "kill_at": 4}
    out = run_script(script, json.dumps(args))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    # Three samples were put and published; the fourth died half-written and was never published.
    assert counts(cfg)["published"] == 3
    samples = tmp_path / "store" / "samples"
    assert [p.name for p in samples.iterdir() if p.name.startswith(".")]  # the torn temp file ...
    assert len(list(samples.glob("*.safetensors"))) == 3  # ... is not a published sample

    stats = run_producer(cfg)  # restart: continues at position 3
    assert stats["resumed_from"] == 3 and stats["published_now"] == N - 3
    seen = consume(cfg)
    assert len(seen) == len(set(seen)) == N
    c = counts(cfg)
    assert c["acked"] == N and c["failed"] == 0 and c["queued"] == 0


def test_producer_dying_between_publish_and_progress_puts_nothing_twice(tmp_path, monkeypatch):
    cfg = producer_cfg(tmp_path)
    real = ProducerProgress.write

    def dies_after_third_publish(self, next_index, published, **info):
        if published == 3:
            raise KeyboardInterrupt("killed after the ledger commit, before the progress file")
        real(self, next_index, published, **info)

    monkeypatch.setattr(ProducerProgress, "write", dies_after_third_publish)
    with pytest.raises(KeyboardInterrupt):
        run_producer(cfg)
    monkeypatch.setattr(ProducerProgress, "write", real)
    assert counts(cfg)["published"] == 3
    assert json.loads(stream_file(cfg.ledger, PROGRESS).read_text())["published"] == 2
    stats = run_producer(cfg)
    assert stats["published"] == N and stats["published_now"] == N - 3
    seen = consume(cfg)
    assert seen == published_ids(cfg) and len(set(seen)) == N
    c = counts(cfg)
    assert c["acked"] == N and c["failed"] == 0  # every ref, including the third, was readable once


# ----------------------------------------------------------------- the trainer dies


KILLED_TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch, lightning as L
    torch.set_num_threads(1)
    from specforge_lightning.contracts import StrategySpec
    from specforge_lightning.data.stores.spec import StoreSpec
    from specforge_lightning.datamodules import StreamDataModule

    args = json.loads(sys.argv[1])
    FEATURES = ("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state")

    class Tiny(L.LightningModule):
        strategy_spec = StrategySpec(name="", features=FEATURES, optional_features=("target_top1",))

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(args["hidden"], 1)

        def training_step(self, batch, batch_idx):
            if self.global_step == args["kill_at_step"]:  # leased and fetched, never acked
                os.kill(os.getpid(), signal.SIGKILL)
            with open(args["log"], "a") as f:
                f.write(json.dumps(batch.sample_ids) + "\\n")
            return self.head(batch.tensors["last_hidden_state"]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = StreamDataModule(source="ledger", batch_size=2, ledger=args["ledger"], store=StoreSpec(**args["store"]))
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(Tiny(), datamodule=dm)
    """
)


class Tiny(L.LightningModule):
    # Every feature but the optional top-1 is required, as for a stream without an algorithm's spec.
    strategy_spec = StrategySpec(
        name="", features=("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state"),
        optional_features=("target_top1",),
    )

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(hidden, 1)
        self.trained: list[str] = []

    def training_step(self, batch, batch_idx):
        self.trained += batch.sample_ids
        return self.head(batch.tensors["last_hidden_state"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.multiprocess
def test_trainer_killed_before_ack_replays_exactly_the_unacked(tmp_path):
    cfg = producer_cfg(tmp_path)
    before, module = kill_trainer_at_step_2_then_restart(cfg, tmp_path, script=KILLED_TRAINER, counts=counts,
                                                         ledger_cls=SqliteLedger, module_cls=Tiny)
    assert sorted(before + module.trained) == sorted(published_ids(cfg))  # nothing unacked is lost
    c = counts(cfg)
    assert c["acked"] == N and c["leased"] == 0 and c["queued"] == 0 and c["failed"] == 0
    assert not list((tmp_path / "store" / "samples").glob("*.safetensors"))  # acked features were freed


def test_acking_twice_changes_nothing_and_never_replays(tmp_path):
    cfg = producer_cfg(tmp_path)
    run_producer(cfg)
    ledger, features, stream, loader = open_stream(cfg)
    it = iter(loader)
    batch = next(it)
    loader.ack_pending()
    assert stream.commit(batch.sample_ids) == 2
    assert stream.commit(batch.sample_ids) == 0  # nothing left staged: a repeat is a no-op
    assert ledger.ack("trainer-rank0", batch.sample_ids) == 0  # the ledger agrees: already acked
    it.close()
    stream.close()
    ledger.close()
    features.close()
    assert counts(cfg)["acked"] == 2
    rest = consume(cfg)
    assert set(rest).isdisjoint(batch.sample_ids) and len(rest) == N - 2


# ----------------------------------------------------------------- bad samples


def _publish_extra(cfg: ProducerConfig, sample_id: str, tensors: dict, **ref_changes) -> None:
    """Publish one hand-made sample into a finished stream (reopened as not done)."""
    store = build_store(cfg.store, consume_once=False)
    ref = dataclasses.replace(store.put(tensors, sample_id), **ref_changes)
    with SqliteLedger(cfg.ledger) as ledger:
        with sqlite3.connect(cfg.ledger) as db:  # reopen the finished stream for one more ref
            db.execute("DELETE FROM meta WHERE k = 'done'")
        ledger.publish([ref])
        ledger.mark_done()


def _sample_like(cfg: ProducerConfig) -> dict[str, torch.Tensor]:
    m = read_stream_manifest(cfg.ledger)
    L_, H = 5, m["hidden_size"]
    return {
        "input_ids": torch.arange(L_), "loss_mask": torch.ones(L_, dtype=torch.long),
        "aux_hidden_states": torch.zeros(L_, 3 * H), "last_hidden_state": torch.zeros(L_, H),
    }


@pytest.mark.parametrize(
    "case, match",
    [("schema", "schema_version 2"), ("shape", "aux_hidden_states.*\\[5, 10\\]"), ("dtype", "last_hidden_state.*float64"),
     ("missing", "lacks features \\['last_hidden_state'\\]")],
)
def test_a_sample_that_breaks_the_manifest_is_refused_clearly(tmp_path, case, match):
    cfg = producer_cfg(tmp_path)
    run_producer(cfg)
    tensors, changes = _sample_like(cfg), {}
    if case == "schema":
        changes["schema_version"] = 2
    elif case == "shape":
        tensors["aux_hidden_states"] = torch.zeros(5, 10)
    elif case == "dtype":
        tensors["last_hidden_state"] = tensors["last_hidden_state"].double()
    else:
        del tensors["last_hidden_state"]
    _publish_extra(cfg, "bad", tensors, **changes)
    with pytest.raises(StreamSchemaError, match=match):
        consume(cfg)
    c = counts(cfg)
    assert c["failed"] == 1 and c["acked"] == N  # the bad sample is failed for good, the good ones trained once
    with SqliteLedger(cfg.ledger) as ledger:
        assert ledger.lease("x", 10, 1.0) == []  # nothing else waits


def test_a_missing_feature_file_is_a_clear_error_and_loses_nothing(tmp_path):
    cfg = producer_cfg(tmp_path)
    run_producer(cfg)
    first = published_ids(cfg)[0]
    [path] = (tmp_path / "store" / "samples").glob(f"{first}.g*.safetensors")
    path.unlink()
    with pytest.raises(FeatureStoreError, match="missing"):
        consume(cfg)
    c = counts(cfg)
    assert c["acked"] == 0 and c["failed"] == 0 and c["queued"] == N  # every ref is still waiting


# ----------------------------------------------------------------- store limits and secrets


def test_a_store_over_its_cap_makes_the_producer_wait_not_fail(tmp_path):
    probe = producer_cfg(tmp_path / "probe")
    run_producer(probe)
    one = max(p.stat().st_size for p in (tmp_path / "probe" / "store" / "samples").glob("*.safetensors"))
    cfg = producer_cfg(tmp_path, max_resident_bytes=3 * one)
    thread = threading.Thread(target=run_producer, args=(cfg,))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while counts_or_zero(cfg) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert 3 <= counts(cfg)["published"] < N and thread.is_alive()  # full: the producer waits
        seen = consume(cfg)
    finally:
        thread.join(60)
    assert len(seen) == len(set(seen)) == N
    assert counts(cfg)["acked"] == N

    tiny_cap = producer_cfg(tmp_path / "tiny", max_resident_bytes=one // 2)
    with pytest.raises(FeatureStoreError, match="can never fit"):
        run_producer(tiny_cap)


def counts_or_zero(cfg: ProducerConfig) -> int:
    try:
        return counts(cfg)["published"] if Path(cfg.ledger).exists() else 0
    except Exception:  # noqa: BLE001 - the producer may still be creating the ledger
        return 0


def test_a_wrong_shared_secret_is_refused_and_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECFORGE_STORE_TOKEN", "right-secret")
    cfg = producer_cfg(tmp_path)
    run_producer(cfg)
    wrong = dataclasses.replace(cfg.store, token="wrong-secret")
    with pytest.raises(FeatureStoreError, match="token mismatch"):
        consume(cfg, wrong)
    assert counts(cfg)["queued"] == N
    monkeypatch.delenv("SPECFORGE_STORE_TOKEN")
    with pytest.raises(FeatureStoreError, match="shared-secret"):
        consume(cfg)  # no token at all is refused too
    monkeypatch.setenv("SPECFORGE_STORE_TOKEN", "right-secret")
    assert len(consume(cfg)) == N and counts(cfg)["acked"] == N
