"""The producer's control plane: progress, stream manifest, lock, watermarks."""

from __future__ import annotations

import threading
import time

import pytest

from specforge_lightning.control.ledger import InMemoryLedger
from specforge_lightning.control.producer import (
    ProducerProgress,
    Publisher,
    producer_lock,
    read_stream_manifest,
    wait_stream_manifest,
    write_stream_manifest,
)
from tests.data.stream_fakes import meta_ref


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


def test_the_store_root_belongs_to_one_ledger_and_a_restart_takes_it_again(tmp_path):
    import json

    from specforge_lightning.control.producer import ProducerConflictError, claim_store_root

    root, first, second = tmp_path / "store", tmp_path / "a" / "ledger.sqlite", tmp_path / "b" / "ledger.sqlite"
    owner = claim_store_root(root, first)
    held = json.loads(owner.read_text())
    assert held["ledger"] == str(first.resolve()) and {"host", "pid"} <= set(held)
    assert claim_store_root(root, first) == owner  # the same ledger: a restarted producer
    with pytest.raises(ProducerConflictError) as err:
        claim_store_root(root, second)
    assert str(first.resolve()) in str(err.value) and str(second.resolve()) in str(err.value)
    assert json.loads(owner.read_text())["ledger"] == str(first.resolve())
