"""One behavioural suite for every Ledger implementation (in memory, SQLite, Redis), plus SQLite's restart check
and the cross-process check of the durable ones (Redis-only checks: test_redis_ledger.py)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

from specforge_lightning.contracts import FeatureSpec, SampleRef
from specforge_lightning.control.ledger import (
    Backpressure,
    InMemoryLedger,
    Ledger,
    LedgerClosedError,
    LedgerRefStream,
)
from specforge_lightning.control.ledger_uri import open_ledger
from specforge_lightning.control.redis_ledger import RedisLedger
from specforge_lightning.control.sqlite_ledger import SqliteLedger
from tests.control.restart_checks import assert_restarted_ledger_state

FAR = 1e12  # a "now" after every lease deadline


def ref(i: int | str) -> SampleRef:
    sid = f"s{i}"
    return SampleRef(
        sample_id=sid,
        store_uri=f"mooncake://{sid}",
        feature_keys={"h": f"run/{sid}/g0/h"},
        feature_specs=(FeatureSpec("h", (1, 8, 4), "bfloat16"),),
        strategy="eagle3",
        num_tokens=8,
    )


def refs(n: int, start: int = 0) -> list[SampleRef]:
    return [ref(i) for i in range(start, start + n)]


def ids(rs) -> list[str]:
    return [r.sample_id for r in rs]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def ledger(request, tmp_path) -> Ledger:
    if request.param == "redis":
        lg = RedisLedger(request.getfixturevalue("redis_server").url())
    else:
        lg = InMemoryLedger() if request.param == "memory" else SqliteLedger(tmp_path / "ledger.sqlite")
    yield lg
    lg.close()


# ---------------------------------------------------------------- shared suite
def test_publish_is_idempotent_on_sample_id(ledger):
    assert ledger.publish(refs(5)) == 5
    assert ledger.publish(refs(5, start=3)) == 3  # s3, s4 known
    assert ledger.publish([]) == 0
    assert ledger.depth() == 8
    assert ledger.counts() == {"published": 8, "queued": 8, "leased": 0, "acked": 0, "failed": 0}


def test_publish_refuses_non_metadata(ledger):
    with pytest.raises(TypeError):
        ledger.publish([SampleRef("x", "mooncake://x", {}, provenance={"blob": b"\x00"})])
    with pytest.raises(TypeError):
        ledger.publish([{"sample_id": "x"}])
    assert ledger.counts()["published"] == 0


def test_lease_is_fifo_and_exclusive(ledger):
    ledger.publish(refs(6))
    a = ledger.lease("a", 2, 60)
    b = ledger.lease("b", 3, 60)
    assert ids(a) == ["s0", "s1"] and ids(b) == ["s2", "s3", "s4"]
    assert a[0] == ref(0)  # the ref comes back whole
    assert ids(ledger.lease("a", 10, 60)) == ["s5"]
    assert ledger.lease("b", 10, 60) == []
    assert ledger.depth() == 0 and ledger.counts()["leased"] == 6
    assert sorted(ledger.leased_by("a")) == ["s0", "s1", "s5"]
    with pytest.raises(ValueError):
        ledger.lease("a", 1, 0)


def test_ack_is_final_and_idempotent(ledger):
    ledger.publish(refs(4))
    ledger.lease("a", 3, 60)
    assert ledger.ack("a", ["s0", "s1"]) == 2
    assert ledger.ack("a", ["s0", "s1"]) == 0  # acking twice is a no-op
    assert ledger.ack("a", ["s1", "s2"]) == 1
    with pytest.raises(KeyError):
        ledger.ack("a", ["never-published"])
    assert ledger.release_consumer("a") == 0 and ledger.expire_leases(now=FAR) == 0
    assert ids(ledger.lease("b", 10, 60, now=FAR)) == ["s3"]  # acked refs never come back
    assert ledger.counts() == {"published": 4, "queued": 0, "leased": 1, "acked": 3, "failed": 0}


def test_fail_requeues_at_tail_or_fails_for_good(ledger):
    ledger.max_attempts = 2
    ledger.publish(refs(3))
    ledger.lease("a", 2, 60)
    assert ledger.fail("b", ["s0"], retryable=True) == 0  # not b's lease
    assert ledger.fail("a", ["s0"], retryable=True) == 1
    assert ledger.fail("a", ["s1"], retryable=False) == 1
    assert ids(ledger.lease("a", 10, 60)) == ["s2", "s0"]  # retried one went to the tail
    assert ledger.fail("a", ["s0"], retryable=True) == 1  # second attempt used up: failed
    assert ledger.depth() == 0
    assert ledger.counts() == {"published": 3, "queued": 0, "leased": 1, "acked": 0, "failed": 2}


def test_expired_leases_return_to_the_queue(ledger):
    ledger.publish(refs(4))
    ledger.lease("a", 2, 10, now=100.0)
    ledger.lease("b", 1, 50, now=100.0)
    assert ledger.expire_leases(now=105.0) == 0
    assert ledger.expire_leases(now=111.0) == 2
    assert ledger.depth() == 3 and ledger.leased_by("a") == []
    assert ids(ledger.lease("c", 10, 100, now=112.0)) == ["s0", "s1", "s3"]  # original order kept
    # lease() expires on its own: b's lease ran out at 150
    assert ids(ledger.lease("c", 10, 10, now=151.0)) == ["s2"]


def test_release_consumer_gives_back_a_dead_trainers_leases(ledger):
    ledger.publish(refs(3))
    ledger.lease("dead", 2, 600)
    ledger.lease("alive", 1, 600)
    assert ledger.release_consumer("dead") == 2
    assert ledger.leased_by("alive") == ["s2"]
    assert ids(ledger.lease("alive", 10, 600)) == ["s0", "s1"]


def test_done_marks_the_end_of_the_stream(ledger):
    ledger.publish(refs(1))
    assert not ledger.is_done()
    ledger.mark_done()
    assert ledger.is_done()
    with pytest.raises(LedgerClosedError):
        ledger.publish(refs(1, start=1))
    assert ledger.depth() == 1  # what was published stays consumable


def test_threads_never_share_a_ref(ledger):
    ledger.publish(refs(60))
    got: dict[str, list[str]] = {"a": [], "b": []}

    def work(name: str) -> None:
        while batch := ledger.lease(name, 2, 60):
            got[name].extend(ids(batch))

    threads = [threading.Thread(target=work, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == sorted(ids(refs(60)))


def test_ref_stream_get_ack_fail_exhausted(ledger):
    stream = LedgerRefStream(ledger, "t0", lease_s=60, poll_s=0.02)
    t0 = time.monotonic()
    assert stream.get(4, timeout_s=0.1) == []  # nothing yet: bounded wait
    assert time.monotonic() - t0 < 2.0
    ledger.publish(refs(3))
    batch = stream.get(2, timeout_s=1.0)
    assert ids(batch) == ["s0", "s1"] and stream.held == {"s0", "s1"}
    assert stream.ack(batch[:1]) == 1
    assert stream.fail(batch[1:], retryable=True) == 1
    ledger.mark_done()
    assert not stream.exhausted()  # s2 and the retried s1 are queued
    rest = stream.get(10, timeout_s=1.0)
    assert ids(rest) == ["s2", "s1"]
    assert not stream.exhausted()  # we still hold them
    stream.ack(rest)
    assert stream.exhausted()
    assert stream.get(10, timeout_s=5.0) == []  # returns at once at the end of the stream


def test_ref_stream_reopened_by_a_restarted_consumer_replays_its_leases(ledger):
    ledger.publish(refs(3))
    first = LedgerRefStream(ledger, "t0", lease_s=60)
    assert ids(first.get(2, timeout_s=1.0)) == ["s0", "s1"]
    first.ack([ref(0)])  # s1 leased but not acked when the trainer dies
    again = LedgerRefStream(ledger, "t0", lease_s=60)
    assert again.reclaimed == 1
    assert ids(again.get(10, timeout_s=1.0)) == ["s1", "s2"]


def test_ref_stream_waits_for_a_late_producer(ledger):
    stream = LedgerRefStream(ledger, "t0", lease_s=60, poll_s=0.02)
    timer = threading.Timer(0.1, lambda: ledger.publish(refs(1)))
    timer.start()
    try:
        assert ids(stream.get(4, timeout_s=5.0)) == ["s0"]
    finally:
        timer.cancel()


def test_backpressure_hysteresis(ledger):
    bp = Backpressure(ledger, high=4, low=2, poll_s=0.01)
    ledger.publish(refs(3))
    assert bp.wait_below(timeout=0.0)  # depth 3 < high
    ledger.publish(refs(2, start=3))
    assert not bp.wait_below(timeout=0.05)  # depth 5 >= high: paused
    ledger.lease("t", 2, 60)
    assert bp.should_pause()  # depth 3: still above low
    ledger.lease("t", 2, 60)
    assert not bp.should_pause()  # depth 1 < low: resumed
    ledger.publish(refs(2, start=5))
    assert not bp.should_pause()  # depth 3 < high: not paused again yet
    with pytest.raises(ValueError):
        Backpressure(ledger, high=2, low=3)


def test_backpressure_wakes_when_consumers_drain(ledger):
    ledger.publish(refs(5))
    bp = Backpressure(ledger, high=4, low=2, poll_s=0.01)
    timer = threading.Timer(0.1, lambda: ledger.lease("t", 5, 60))
    timer.start()
    try:
        assert bp.wait_below(timeout=5.0)
    finally:
        timer.cancel()


# ------------------------------------------------------ SQLite: restart and processes
def test_sqlite_restart_keeps_acks_and_unacked_refs(tmp_path):
    path = tmp_path / "ledger.sqlite"
    lg = SqliteLedger(path)
    lg.publish(refs(6))
    lg.lease("a", 3, 60, now=100.0)
    lg.ack("a", ["s0", "s1"])
    lg.close()  # the trainer dies holding s2

    lg = SqliteLedger(path)
    assert_restarted_ledger_state(lg)
    lg.close()
    with pytest.raises(RuntimeError, match="closed"):
        lg.depth()


def _produce(path: str, n: int) -> None:
    lg = open_ledger(path)
    for start in range(0, n, 5):
        lg.publish(refs(5, start=start))
        time.sleep(0.01)
    lg.mark_done()
    lg.close()


def _consume(path: str, name: str, out: str) -> None:
    lg = open_ledger(path)
    stream = LedgerRefStream(lg, name, lease_s=60, poll_s=0.02)
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while not stream.exhausted() and time.monotonic() < deadline:
        batch = stream.get(3, timeout_s=0.5)
        seen.extend(ids(batch))
        stream.ack(batch)
    Path(out).write_text("\n".join(seen))
    lg.close()


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_two_consumer_processes_never_share_a_ref(tmp_path, request, kind):
    if kind == "redis":
        path = request.getfixturevalue("redis_server").url()
    else:
        path = str(tmp_path / "ledger.sqlite")
        SqliteLedger(path).close()  # create the schema before anyone races for it
    n = 40
    ctx = mp.get_context("spawn")
    outs = [str(tmp_path / f"c{i}.txt") for i in range(2)]
    procs = [ctx.Process(target=_produce, args=(path, n))]
    procs += [ctx.Process(target=_consume, args=(path, f"c{i}", outs[i])) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    got = [[s for s in Path(o).read_text().splitlines() if s] for o in outs]
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(ids(refs(n)))
    lg = open_ledger(path)
    assert lg.counts() == {"published": n, "queued": 0, "leased": 0, "acked": n, "failed": 0} and lg.is_done()
    lg.close()
