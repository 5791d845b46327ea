"""The ledger: which published samples are queued, leased, acked or failed.

An online stream is a producer publishing SampleRefs and trainers leasing them.
The ledger is the single source of truth for that hand-off: every ref goes to
exactly one live lease, an acked ref is never handed out again, and a ref whose
lease expired (or whose consumer died) goes back to the queue. It moves metadata
only: every record is checked with ``assert_no_tensors`` before it is stored.

``InMemoryLedger`` serves tests and single-process runs; ``SqliteLedger``
(``sqlite_ledger.py``) serves several processes on one machine and survives restarts.
"""

from __future__ import annotations

import heapq
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from specforge_lightning.contracts import SampleRef, assert_no_tensors

QUEUED, LEASED, ACKED, FAILED = "queued", "leased", "acked", "failed"
STATES = (QUEUED, LEASED, ACKED, FAILED)


class LedgerClosedError(RuntimeError):
    """The producer marked the stream done; nothing more may be published."""


class Ledger(ABC):
    """A durable work queue of SampleRefs with leases and acks.

    Semantics shared by every implementation (one test suite checks them all):
    ``publish`` is idempotent on ``sample_id``; ``lease`` first returns expired
    leases to the queue, then hands out queued refs in publish order; ``ack`` is
    final (a repeat returns 0); a retryable ``fail`` re-queues at the tail until
    ``max_attempts`` leases were used up, a non-retryable one is final.
    """

    max_attempts: int = 3

    @abstractmethod
    def publish(self, refs: Sequence[SampleRef]) -> int:
        """Add refs to the queue; returns how many were new (known ids are ignored)."""

    @abstractmethod
    def lease(self, consumer: str, max_items: int, lease_s: float, *, now: float | None = None) -> list[SampleRef]:
        """Hand up to ``max_items`` queued refs to ``consumer`` until ``now + lease_s``."""

    @abstractmethod
    def ack(self, consumer: str, sample_ids: Iterable[str]) -> int:
        """Mark samples trained, durably; returns how many were not acked before. Unknown ids raise KeyError."""

    @abstractmethod
    def fail(self, consumer: str, sample_ids: Iterable[str], retryable: bool) -> int:
        """Give back samples leased by ``consumer``: re-queue (retryable) or fail them for good."""

    @abstractmethod
    def expire_leases(self, now: float | None = None) -> int:
        """Return leases whose deadline passed to the queue; returns how many."""

    @abstractmethod
    def release_consumer(self, consumer: str) -> int:
        """Return every lease of ``consumer`` (a trainer that died or left) to the queue."""

    @abstractmethod
    def depth(self) -> int:
        """Refs published and waiting: not leased, acked or failed."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """``published`` plus one count per state (queued, leased, acked, failed)."""

    @abstractmethod
    def leased_by(self, consumer: str) -> list[str]:
        """Sample ids currently leased to ``consumer``."""

    @abstractmethod
    def mark_done(self) -> None:
        """Producer side: the stream has ended, no more refs will be published."""

    @abstractmethod
    def is_done(self) -> bool: ...

    def close(self) -> None:
        """Release resources; the ledger is unusable afterwards."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_refs(refs: Sequence[SampleRef]) -> None:
    for ref in refs:
        if not isinstance(ref, SampleRef):
            raise TypeError(f"the ledger stores SampleRefs, got {type(ref).__name__}")
        assert_no_tensors(ref, f"ref {ref.sample_id}")


def check_lease_args(max_items: int, lease_s: float) -> None:
    if max_items < 0 or lease_s <= 0:
        raise ValueError(f"lease needs max_items >= 0 and lease_s > 0, got {max_items}, {lease_s}")


@dataclass
class _Entry:
    ref: SampleRef
    seq: int
    state: str = QUEUED
    consumer: str | None = None
    deadline: float = 0.0
    attempts: int = 0


class InMemoryLedger(Ledger):
    """A ledger in one process's memory (thread-safe), for tests and single-process runs."""

    def __init__(self, max_attempts: int = 3) -> None:
        self.max_attempts = max_attempts
        self._entries: dict[str, _Entry] = {}
        self._queue: list[tuple[int, str]] = []  # heap of (seq, sample_id); stale pairs skipped on pop
        self._seq = 0
        self._done = False
        self._lock = threading.Lock()

    def _enqueue(self, e: _Entry, *, to_tail: bool) -> None:
        if to_tail:
            self._seq += 1
            e.seq = self._seq
        e.state, e.consumer, e.deadline = QUEUED, None, 0.0
        heapq.heappush(self._queue, (e.seq, e.ref.sample_id))

    def publish(self, refs: Sequence[SampleRef]) -> int:
        check_refs(refs)
        with self._lock:
            if self._done:
                raise LedgerClosedError("the stream was marked done; cannot publish more refs")
            new = 0
            for ref in refs:
                if ref.sample_id in self._entries:
                    continue
                self._seq += 1
                e = _Entry(ref, self._seq)
                self._entries[ref.sample_id] = e
                heapq.heappush(self._queue, (e.seq, ref.sample_id))
                new += 1
            return new

    def lease(self, consumer: str, max_items: int, lease_s: float, *, now: float | None = None) -> list[SampleRef]:
        check_lease_args(max_items, lease_s)
        now = time.time() if now is None else now
        with self._lock:
            self._expire(now)
            out: list[SampleRef] = []
            while self._queue and len(out) < max_items:
                seq, sid = heapq.heappop(self._queue)
                e = self._entries[sid]
                if e.state != QUEUED or e.seq != seq:
                    continue
                e.state, e.consumer, e.deadline = LEASED, consumer, now + lease_s
                e.attempts += 1
                out.append(e.ref)
            return out

    def ack(self, consumer: str, sample_ids: Iterable[str]) -> int:
        with self._lock:
            entries = [self._get(sid) for sid in sample_ids]
            new = 0
            for e in entries:
                if e.state != ACKED:
                    e.state, e.consumer, e.deadline = ACKED, consumer, 0.0
                    new += 1
            return new

    def fail(self, consumer: str, sample_ids: Iterable[str], retryable: bool) -> int:
        with self._lock:
            changed = 0
            for sid in sample_ids:
                e = self._get(sid)
                if e.state != LEASED or e.consumer != consumer:
                    continue  # not ours any more (expired, acked, ...): nothing to give back
                if retryable and e.attempts < self.max_attempts:
                    self._enqueue(e, to_tail=True)
                else:
                    e.state, e.consumer, e.deadline = FAILED, None, 0.0
                changed += 1
            return changed

    def expire_leases(self, now: float | None = None) -> int:
        with self._lock:
            return self._expire(time.time() if now is None else now)

    def _expire(self, now: float) -> int:
        expired = [e for e in self._entries.values() if e.state == LEASED and e.deadline <= now]
        for e in expired:
            self._enqueue(e, to_tail=False)
        return len(expired)

    def release_consumer(self, consumer: str) -> int:
        with self._lock:
            mine = [e for e in self._entries.values() if e.state == LEASED and e.consumer == consumer]
            for e in mine:
                self._enqueue(e, to_tail=False)
            return len(mine)

    def depth(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.state == QUEUED)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {"published": len(self._entries), **{s: 0 for s in STATES}}
            for e in self._entries.values():
                out[e.state] += 1
            return out

    def leased_by(self, consumer: str) -> list[str]:
        with self._lock:
            return [sid for sid, e in self._entries.items() if e.state == LEASED and e.consumer == consumer]

    def mark_done(self) -> None:
        with self._lock:
            self._done = True

    def is_done(self) -> bool:
        with self._lock:
            return self._done

    def _get(self, sample_id: str) -> _Entry:
        try:
            return self._entries[sample_id]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} was never published to this ledger") from None


class LedgerRefStream:
    """One consumer's view of a Ledger, in the loader's stream protocol (get / ack / fail / exhausted).

    A consumer name belongs to one live stream. Opening a stream returns the leases
    that name still holds (a restarted trainer's unacked refs) to the queue: they
    were never durably trained, so they must replay.
    """

    def __init__(
        self, ledger: Ledger, consumer: str, *, lease_s: float = 600.0, poll_s: float = 0.2
    ) -> None:
        self.ledger = ledger
        self.consumer = consumer
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.reclaimed = ledger.release_consumer(consumer)
        self._held: set[str] = set()

    def get(self, max_items: int, timeout_s: float) -> list[SampleRef]:
        """Lease up to ``max_items`` refs, waiting at most ``timeout_s``; [] on timeout or end of stream."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        sleep = 0.01
        while True:
            refs = self.ledger.lease(self.consumer, max_items, self.lease_s)
            if refs:
                self._held.update(r.sample_id for r in refs)
                return refs
            left = deadline - time.monotonic()
            if left <= 0 or self.exhausted():
                return []
            time.sleep(min(sleep, left))
            sleep = min(sleep * 2, self.poll_s)

    def ack(self, refs: Sequence[SampleRef]) -> int:
        ids = [r.sample_id for r in refs]
        n = self.ledger.ack(self.consumer, ids)
        self._held.difference_update(ids)
        return n

    def fail(self, refs: Sequence[SampleRef], retryable: bool) -> int:
        ids = [r.sample_id for r in refs]
        n = self.ledger.fail(self.consumer, ids, retryable)
        self._held.difference_update(ids)
        return n

    @property
    def held(self) -> frozenset[str]:
        """Sample ids leased through this stream and not yet acked or failed."""
        return frozenset(self._held)

    def exhausted(self) -> bool:
        """True once the producer is done, nothing is queued and this consumer holds nothing."""
        return self.ledger.is_done() and self.ledger.depth() == 0 and not self._held


class Backpressure:
    """Producer-side hysteresis: pause once depth reaches ``high``, resume when it drops below ``low``."""

    def __init__(self, ledger: Ledger, high: int, low: int, *, poll_s: float = 0.1) -> None:
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
        self.ledger, self.high, self.low, self.poll_s = ledger, high, low, poll_s
        self.paused = False

    def should_pause(self) -> bool:
        depth = self.ledger.depth()
        if self.paused:
            self.paused = depth >= self.low
        else:
            self.paused = depth >= self.high
        return self.paused

    def wait_below(self, timeout: float | None = None) -> bool:
        """Block while paused; True when the producer may publish, False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.should_pause():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(self.poll_s if left is None else min(self.poll_s, left))
        return True
