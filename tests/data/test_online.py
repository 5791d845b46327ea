"""Online data plane: ranked ledger streams, colocated capture, producer bookkeeping, configs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from specforge_lightning.contracts import SCHEMA_VERSION, FeatureSpec, PromptTask, SampleRef
from specforge_lightning.control.ledger import InMemoryLedger
from specforge_lightning.control.producer import (
    ProducerProgress,
    Publisher,
    producer_lock,
    read_stream_manifest,
    wait_stream_manifest,
    write_stream_manifest,
)
from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.online import (
    ColocatedRefSource,
    RankedLedgerStream,
    RefCheck,
    StreamSchemaError,
    capture_in_order,
    epoch_sample_ids,
    put_with_retry,
)
from specforge_lightning.data.stores.base import FeatureStoreError
from specforge_lightning.data.stores.local import LocalFeatureStore

REPO = Path(__file__).resolve().parents[2]
H = 4
MANIFEST = {"schema_version": SCHEMA_VERSION, "hidden_size": H, "layer_ids": [0, 1, 2], "capture_dtype": "float32",
            "max_length": 16}


# ----------------------------------------------------------------- helpers


class FakeEngine:
    """Deterministic features from token ids; records each capture batch."""

    def __init__(self, fail_after: int | None = None, nan_ids: tuple[str, ...] = ()) -> None:
        self.batches: list[list[str]] = []
        self.fail_after = fail_after
        self.nan_ids = nan_ids

    def capture(self, tasks, layer_ids):
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("target exploded")
        self.batches.append([t.task_id for t in tasks])
        out = []
        for t in tasks:
            ids = torch.tensor(t.input_ids)
            base = ids.float().unsqueeze(-1)
            last = base.repeat(1, H) + torch.arange(H)
            if t.task_id in self.nan_ids:
                last[0, 0] = float("nan")
            out.append({"input_ids": ids, "loss_mask": torch.tensor(t.loss_mask), "last_hidden_state": last,
                        "aux_hidden_states": base.repeat(1, len(layer_ids) * H)})
        return out


def tasks(n: int, lengths=None) -> list[PromptTask]:
    out = []
    for i in range(n):
        length = lengths[i] if lengths else 3 + i % 4
        out.append(PromptTask(f"t{i:02d}", tuple(range(i, i + length)), (0,) + (1,) * (length - 1)))
    return out


def meta_ref(i: int, **kw) -> SampleRef:
    return SampleRef(f"s{i}", f"mem://s{i}", {"x": "x"}, **kw)


class ThreadComm:
    """Collectives between threads, standing in for torch.distributed ranks."""

    def __init__(self, shared: dict, rank: int, world_size: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, world_size

    def _lane(self, channel: str) -> dict:
        with self.shared["lock"]:
            return self.shared.setdefault(channel, {"barrier": threading.Barrier(self.world_size), "slots": {}})

    def broadcast(self, obj, channel):
        lane = self._lane(channel)
        if self.rank == 0:
            lane["value"] = obj
        lane["barrier"].wait()
        value = lane["value"]
        lane["barrier"].wait()
        return value

    def all_gather(self, obj, channel):
        lane = self._lane(channel)
        lane["slots"][self.rank] = obj
        lane["barrier"].wait()
        out = [lane["slots"][r] for r in range(self.world_size)]
        lane["barrier"].wait()
        return out


def run_ranks(world: int, fn) -> list:
    shared = {"lock": threading.Lock()}
    results: list = [None] * world
    errors: list = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(shared, rank, world))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    return results


# ----------------------------------------------------------------- RankedLedgerStream


def test_ranks_get_round_robin_rounds_and_the_short_tail_is_dropped():
    ledger = InMemoryLedger()
    ledger.publish([meta_ref(i) for i in range(7)])
    ledger.mark_done()

    def rank(comm):
        stream = RankedLedgerStream(ledger, "job", comm=comm, poll_s=0.01)
        got = []
        while not stream.exhausted():
            got.append([r.sample_id for r in stream.get(2, 0.05)])
        return stream, got

    (s0, got0), (s1, got1) = run_ranks(2, rank)
    assert got0 == [["s0", "s2"], ["s4"], []] and got1 == [["s1", "s3"], ["s5"], []]
    assert ledger.leased_by("job-rank0") == ["s0", "s2", "s4"] and ledger.leased_by("job-rank1") == ["s1", "s3", "s5"]
    assert ledger.counts()["failed"] == 1 and s0.dropped == 1  # s6 fits no whole round: never trained

    def commit(comm):
        stream = [s0, s1][comm.rank]
        mine = {0: ["s0", "s2", "s4"], 1: ["s1", "s3", "s5"]}[comm.rank]
        stream.ack([meta_ref(int(sid[1:])) for sid in mine])  # what the loader handed over
        n = stream.commit(mine[:2])  # the optimizer stepped on the first two; the third is a lookahead
        return n, stream.close()

    results = run_ranks(2, commit)
    assert [n for n, _ in results] == [2, 2]
    assert ledger.counts()["acked"] == 4 and ledger.counts()["queued"] == 2  # s4, s5 returned by close
    assert [r.sample_id for r in ledger.lease("next", 5, 1.0)] == ["s4", "s5"]  # in their original order


def test_a_restarted_rank_reclaims_its_dead_leases_and_never_sees_acked_refs():
    ledger = InMemoryLedger()
    ledger.publish([meta_ref(i) for i in range(4)])
    first = RankedLedgerStream(ledger, "job")
    refs = first.get(3, 0)
    first.ack(refs)
    first.commit([refs[0].sample_id])
    assert first.commit([refs[0].sample_id]) == 0  # a second commit of the same ids is a no-op
    # the process dies here: no close()
    second = RankedLedgerStream(ledger, "job")
    assert second.reclaimed == 2
    ledger.mark_done()
    seen = []
    while not second.exhausted():
        seen += [r.sample_id for r in second.get(4, 0.01)]
    assert seen == ["s1", "s2", "s3"]


def test_retryable_failures_keep_their_place_without_a_retry_penalty():
    ledger = InMemoryLedger(max_attempts=1)
    ledger.publish([meta_ref(i) for i in range(3)])
    for _ in range(3):  # three runs that each stop early; max_attempts=1 must not fail the refs for good
        stream = RankedLedgerStream(ledger, "job")
        refs = stream.get(2, 0)
        stream.fail(refs, retryable=True)
        stream.close()
    assert ledger.counts() == {"published": 3, "queued": 3, "leased": 0, "acked": 0, "failed": 0}


def test_producer_failure_reaches_the_consumer():
    ledger = InMemoryLedger()
    stream = RankedLedgerStream(ledger, "job", producer_error=lambda: RuntimeError("target exploded"))
    with pytest.raises(RuntimeError, match="producer failed.*target exploded"):
        stream.get(1, 0)


def test_ref_check_names_the_sample_and_the_field():
    check = RefCheck(MANIFEST)
    specs = (FeatureSpec("input_ids", (5,), "int64"), FeatureSpec("loss_mask", (5,), "int64"),
             FeatureSpec("aux_hidden_states", (5, 12), "float32"), FeatureSpec("last_hidden_state", (5, 4), "float32"))
    keys = {s.name: s.name for s in specs}
    good = SampleRef("ok", "mem://ok", keys, specs)
    check(good)
    # The optional target_top1 may be absent (above); when present its spec is checked too.
    top1 = FeatureSpec("target_top1", (5,), "int64")
    check(SampleRef("top1", "mem://top1", {**keys, "target_top1": "target_top1"}, specs + (top1,)))
    wrong = FeatureSpec("target_top1", (5,), "float32")
    with pytest.raises(StreamSchemaError, match="'target_top1' is"):
        check(SampleRef("top1f", "mem://top1f", {**keys, "target_top1": "target_top1"}, specs + (wrong,)))
    bad_len = SampleRef("long", "mem://long", keys, tuple(FeatureSpec(s.name, (20, *s.shape[1:]), s.dtype) for s in specs))
    with pytest.raises(StreamSchemaError, match="'long' has 20 tokens"):
        check(bad_len)
    mixed = SampleRef("mixed", "mem://m", keys, specs[:3] + (FeatureSpec("last_hidden_state", (4, 4), "float32"),))
    with pytest.raises(StreamSchemaError, match="disagree on the sequence length"):
        check(mixed)
    with pytest.raises(StreamSchemaError, match="'v9' has schema_version 9"):
        check(SampleRef("v9", "mem://v9", keys, specs, schema_version=9))


def test_schema_error_fails_the_ref_for_good_and_reaches_every_rank():
    ledger = InMemoryLedger()
    bad = SampleRef("bad", "mem://bad", {"input_ids": "input_ids"})
    ledger.publish([bad])

    def rank(comm):
        stream = RankedLedgerStream(ledger, "job", comm=comm, check=RefCheck(MANIFEST))
        with pytest.raises(StreamSchemaError, match="'bad' lacks features"):
            stream.get(1, 0)
        return True

    assert run_ranks(2, rank) == [True, True]
    assert ledger.counts()["failed"] == 1


def test_loader_commit_acks_only_what_was_trained():
    """Lightning fetches one batch ahead: a commit must not ack the lookahead."""
    store = LocalFeatureStore()
    ledger = InMemoryLedger()
    ledger.publish([store.put({"input_ids": torch.arange(3) + i}, f"s{i}") for i in range(6)])
    ledger.mark_done()
    stream = RankedLedgerStream(ledger, "job", store=store, free_on_ack=True)
    loader = FeatureDataLoader(store, stream=stream, batch_size=2, ack_mode="manual", poll_timeout_s=0.01)
    it = iter(loader)
    trained, lookahead = next(it), next(it)
    loader.ack_pending()
    assert stream.commit(trained.sample_ids) == 2
    assert ledger.counts()["acked"] == 2 and stream.health()["staged"] == 2
    assert store.health()["resident_samples"] == 4  # acked features freed, the others kept
    it.close()
    stream.close()
    assert ledger.counts()["queued"] == 4
    assert [r.sample_id for r in ledger.lease("next", 2, 1.0)] == lookahead.sample_ids  # back first, in order


# ----------------------------------------------------------------- capture and the colocated source


def test_capture_in_order_uses_prepares_batching_and_resumes_inside_a_chunk():
    ts = tasks(7, lengths=[5, 3, 4, 3, 6, 2, 3])
    engine = FakeEngine(nan_ids=("t04",))
    out = list(capture_in_order(engine, ts, [0, 1, 2], chunk_size=4, batch_size=2))
    assert [pos for pos, _ in out] == list(range(7))
    assert engine.batches == [["t01", "t03"], ["t02", "t00"], ["t05", "t06"], ["t04"]]  # stable length sort per chunk
    assert out[4][1] is None and out[0][1]["last_hidden_state"].shape == (5, H)
    engine.batches.clear()
    resumed = list(capture_in_order(engine, ts, [0, 1, 2], chunk_size=4, batch_size=2, start=5))
    assert [pos for pos, _ in resumed] == [5, 6] and engine.batches == [["t05", "t06"], ["t04"]]
    assert torch.equal(resumed[0][1]["aux_hidden_states"], out[5][1]["aux_hidden_states"])


def test_colocated_source_streams_every_task_once_under_backpressure():
    source = ColocatedRefSource(FakeEngine(), tasks(10), [0, 1, 2], batch_size=3, chunk_size=4, high_watermark=3,
                                low_watermark=1, epochs=2, check=RefCheck(MANIFEST))
    loader = FeatureDataLoader(source.store, stream=source.stream, batch_size=2, ack_mode="manual", poll_timeout_s=0.05)
    source.start()
    seen, depths = [], []
    for batch in loader:
        time.sleep(0.01)  # a slow trainer: the capture thread must wait, not pile up
        depths.append(source.ledger.depth())
        seen += batch.sample_ids
        loader.ack_pending()
        source.stream.commit(batch.sample_ids)
    source.stop()
    assert seen == [f"t{i:02d}" for i in range(10)] + [f"t{i:02d}@e1" for i in range(10)]
    assert max(depths) <= 3 and source.health()["acked"] == 20
    assert source.store.health()["resident_samples"] == 0  # consume-once


def test_colocated_source_shards_by_rank_and_reports_capture_errors():
    ranks = [ColocatedRefSource(FakeEngine(), tasks(5), [0, 1, 2], rank=r, world_size=2, shuffle=True, seed=3)
             for r in range(2)]
    ids = []
    for src in ranks:
        src.start().join(10)
        ids.append([r.sample_id for r in src.stream.get(10, 0)])
    assert len(ids[0]) == len(ids[1]) == 3  # padded like DistributedSampler
    assert set(ids[0]) | set(ids[1]) == {f"t{i:02d}" for i in range(5)}
    broken = ColocatedRefSource(FakeEngine(fail_after=1), tasks(6), [0, 1, 2], batch_size=2, chunk_size=2)
    broken.start().join(10)
    assert broken.published == 2  # the first chunk made it through, then the target failed:
    with pytest.raises(RuntimeError, match="target exploded"):  # the trainer learns at its next get
        broken.stream.get(2, 0)


def test_colocated_stop_ends_a_paused_capture_thread():
    source = ColocatedRefSource(FakeEngine(), tasks(20), [0, 1, 2], high_watermark=2, low_watermark=1).start()
    deadline = time.monotonic() + 5
    while source.ledger.depth() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    source.stop(timeout_s=5)
    assert not source._thread.is_alive() and source.error is None and source.published == 2


def test_epoch_sample_ids_are_unique():
    ts = tasks(3)
    assert epoch_sample_ids(ts, [0, 1, 0], 0) == ["t00", "t01", "t00#1"]
    assert epoch_sample_ids(ts, [2], 1) == ["t02@e1"]


def test_put_with_retry_waits_for_space_and_refuses_what_never_fits():
    store = LocalFeatureStore(max_resident_bytes=100)
    store.put({"x": torch.zeros(20)}, "a")  # 80 bytes
    threading.Timer(0.1, store.abort, args=("a",)).start()
    t0 = time.monotonic()
    put_with_retry(store, {"x": torch.zeros(10)}, "b", retry_s=5)
    assert time.monotonic() - t0 >= 0.09
    with pytest.raises(FeatureStoreError, match="can never fit"):
        put_with_retry(store, {"x": torch.zeros(30)}, "c")


# ----------------------------------------------------------------- producer bookkeeping


def test_progress_resume_reconciles_with_the_ledger(tmp_path):
    progress = ProducerProgress(tmp_path / "ledger.sqlite")
    assert progress.resume(0).check_orphan is False
    progress.write(next_index=5, published=4)
    point = progress.resume(4)
    assert (point.next_index, point.already_published, point.check_orphan) == (5, 0, True)
    assert progress.resume(5).already_published == 1  # died between publish and progress write
    with pytest.raises(RuntimeError, match="another producer"):
        progress.resume(9)


def test_stream_manifest_refuses_another_identity_and_waits(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    with pytest.raises(TimeoutError, match="start the producer"):
        wait_stream_manifest(ledger, 0.05)
    write_stream_manifest(ledger, {"target": "a", "max_length": 8}, ("target", "max_length"))
    write_stream_manifest(ledger, {"target": "a", "max_length": 8}, ("target", "max_length"))  # same: fine
    with pytest.raises(ValueError, match="max_length"):
        write_stream_manifest(ledger, {"target": "a", "max_length": 9}, ("target", "max_length"))
    assert read_stream_manifest(ledger)["format"] == "specforge-stream"


def test_one_producer_per_ledger(tmp_path):
    with producer_lock(tmp_path / "ledger.sqlite"):
        with pytest.raises(RuntimeError, match="another producer"):
            with producer_lock(tmp_path / "ledger.sqlite"):
                pass
    with producer_lock(tmp_path / "ledger.sqlite"):  # released: a restart may take it
        pass


def test_publisher_pauses_above_high_and_resumes_below_low(tmp_path):
    ledger = InMemoryLedger()
    pub = Publisher(ledger, ProducerProgress(tmp_path / "l.sqlite"), high_watermark=3, low_watermark=1)
    for i in range(3):
        pub.wait()
        pub.publish(meta_ref(i), i + 1)
    released = []

    def drain() -> None:
        time.sleep(0.15)
        released.extend(ledger.lease("c", 2, 10.0))  # depth 3 -> 1: still not below low
        time.sleep(0.15)
        released.extend(ledger.lease("c", 1, 10.0))  # depth 0: resume

    thread = threading.Thread(target=drain)
    thread.start()
    t0 = time.monotonic()
    pub.wait()
    assert time.monotonic() - t0 >= 0.25 and len(released) == 3
    thread.join()
    assert ProducerProgress(tmp_path / "l.sqlite").read() == {"next_index": 3, "published": 3}
    assert "published 3 refs" in pub.summary_line()


# ----------------------------------------------------------------- configs and CLI


def test_produce_cli_reads_the_fit_config():
    from specforge_lightning.target.producer import parse_args

    cfg = parse_args(["--config", str(REPO / "configs/eagle3-tiny-stream.yaml"), "--prepare.num_samples=6",
                      "--store.root=/tmp/elsewhere"])
    assert cfg.prepare.target == "tiny-llama" and cfg.prepare.num_samples == 6 and cfg.prepare.shard_size == 16
    assert cfg.store.kind == "shared_dir" and cfg.store.root == "/tmp/elsewhere" and cfg.epochs == 2
    assert cfg.ledger.endswith("ledger.sqlite") and (cfg.high_watermark, cfg.low_watermark) == (16, 8)


@pytest.mark.parametrize("name, source", [("eagle3-tiny-colocated.yaml", "colocated"), ("eagle3-tiny-stream.yaml", "ledger")])
def test_fit_configs_parse(name, source, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["specforge_lightning"])

    from specforge_lightning.data.stream_datamodule import StreamDataModule

    cli = LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=["--config", str(REPO / "configs" / name), "--trainer.logger=false"])
    assert isinstance(cli.datamodule, StreamDataModule) and cli.datamodule.source == source
    assert cli.datamodule.prepare_cfg.target == "tiny-llama"


# ----------------------------------------------------------------- generate once, reuse (real tiny target)


def _fit(datamodule, steps, callbacks=()):
    from specforge_lightning.algorithms.eagle3 import Eagle3Module

    L.seed_everything(0, verbose=False)
    module = Eagle3Module(ttt_length=2, lr=1e-3)
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Losses(), *callbacks])
    trainer.fit(module, datamodule=datamodule)
    return losses, trainer


def test_colocated_save_dir_is_reused_offline(tmp_path, monkeypatch):
    from specforge_lightning.callbacks.stream_health import StreamHealth
    from specforge_lightning.data.datamodule import FeatureDataModule
    from specforge_lightning.data.stream_datamodule import StreamDataModule
    from specforge_lightning.target import engine as engine_mod
    from specforge_lightning.target.prepare import PrepareConfig, prepare, read_manifest

    cfg = PrepareConfig(output_dir=str(tmp_path / "saved"), target="tiny-llama", num_samples=6, num_val_samples=2,
                        max_length=32, draft_vocab_size=64, batch_size=4, shard_size=4, capture_dtype="float32",
                        compute_dtype="float32")
    health = StreamHealth()
    dm = StreamDataModule(source="colocated", prepare=cfg, batch_size=2, save_dir=cfg.output_dir)
    online, trainer = _fit(dm, 3, [health])
    manifest = read_manifest(cfg.output_dir)
    assert manifest["complete"] and len(manifest["splits"]["train"]["shards"]) == 2
    assert len(manifest["splits"]["val"]["shards"]) == 1
    assert {"stream/data_wait_s", "stream/data_wait_fraction", "stream/queue_depth", "stream/acked",
            "stream/producer_samples_per_s"} <= set(trainer.callback_metrics)
    assert health.summary()["steps"] == 3 and health.summary()["acked"] == 6

    def no_capture(*a, **kw):
        raise AssertionError("the saved features must be reused, not captured again")

    monkeypatch.setattr(engine_mod.HFTargetEngine, "from_path", no_capture)
    assert prepare(cfg, progress=False)["complete"]  # prepare sees a finished directory
    offline, _ = _fit(FeatureDataModule(prepare=cfg, batch_size=2, shuffle=False, prefetch=0), 3)
    assert offline == online
