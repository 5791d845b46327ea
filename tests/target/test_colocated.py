"""ColocatedRefSource: the capture thread, its backpressure, rank shards, errors and stop."""

from __future__ import annotations

import time

import pytest

from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.manifest import RefCheck
from specforge_lightning.target.colocated import ColocatedRefSource
from tests.data.stream_fakes import FakeEngine, MANIFEST, tasks


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
