"""One trainer rank's RefStream over a Ledger, and the rank collectives it runs on.

Rank 0 leases for every rank, round-robin, and hands out whole rounds, so rank r
sees the samples ``DistributedSampler`` would give it and every rank gets the same
number of batches (no DDP hang at the end). Acks are staged and committed durably at
optimizer boundaries in one ledger transaction for all ranks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch.distributed as dist

from specforge_lightning.contracts import SampleRef
from specforge_lightning.control.ledger import Ledger
from specforge_lightning.data.manifest import StreamSchemaError
from specforge_lightning.data.stores.base import FeatureStore

log = logging.getLogger(__name__)


class RankComm(Protocol):
    """Collectives among the trainer ranks; ``channel`` names an independent, ordered lane."""

    rank: int
    world_size: int

    def broadcast(self, obj: Any, channel: str) -> Any: ...

    def all_gather(self, obj: Any, channel: str) -> list[Any]: ...


class LocalComm:
    """One rank: every collective is the identity."""

    rank = 0
    world_size = 1

    def broadcast(self, obj: Any, channel: str) -> Any:
        return obj

    def all_gather(self, obj: Any, channel: str) -> list[Any]:
        return [obj]


class TorchComm:
    """torch.distributed object collectives on private gloo groups, one per channel.

    Private groups keep stream coordination from interleaving with DDP's own
    collectives. Every rank must construct this at the same point (``new_group``
    is collective).
    """

    CHANNELS = ("get", "commit")

    def __init__(self) -> None:
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._groups = {name: dist.new_group(backend="gloo") for name in self.CHANNELS}

    def broadcast(self, obj: Any, channel: str) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0, group=self._groups[channel])
        return box[0]

    def all_gather(self, obj: Any, channel: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._groups[channel])
        return out


class RankedLedgerStream:
    """One trainer rank's RefStream over a Ledger, in lockstep with the other ranks.

    Rank 0 is the only one that leases: it leases one ref at a time for rank
    ``i % world_size`` under that rank's consumer name ``{consumer}-rank{r}`` and
    hands out whole rounds, so the sample order is ``DistributedSampler``'s (without
    shuffle) and all ranks get equal counts. A final round too small for every rank
    is failed for good (never trained) and its features aborted.

    Acks: the loader's ``ack`` only stages refs; ``commit(trained_ids)`` (called at an
    optimizer boundary on every rank) acks the staged prefix up to the last trained
    sample, for all ranks in one ledger transaction on rank 0, then frees those
    samples' features when ``free_on_ack``. A retryable ``fail`` and ``close`` return
    leases to the queue in their original order (no retry penalty), so a restart
    replays exactly what was not acked.

    Leases are not renewed: ``lease_s`` must exceed the longest time a ref waits
    between lease and commit (default one hour).
    """

    def __init__(
        self,
        ledger: Ledger,
        consumer: str,
        *,
        comm: RankComm | None = None,
        lease_s: float = 3600.0,
        poll_s: float = 0.05,
        check: Callable[[SampleRef], None] | None = None,
        store: FeatureStore | None = None,
        free_on_ack: bool = False,
        producer_error: Callable[[], BaseException | None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.comm: RankComm = comm or LocalComm()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.names = [f"{consumer}-rank{r}" for r in range(self.world_size)]
        self.consumer = self.names[self.rank]
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.check = check
        self.store = store
        self.free_on_ack = free_on_ack
        self.producer_error = producer_error
        self._buffer: list[SampleRef] = []  # rank 0: leased, not handed out; index i is rank i % world's
        self._staged: list[SampleRef] = []  # yielded by the loader, waiting for a durable commit
        self._held: dict[str, SampleRef] = {}
        self._exhausted = False
        self._closed = False
        self._lock = threading.Lock()  # a prefetch thread gets while the main thread commits
        self.committed = 0
        self.dropped = 0
        reclaimed = sum(ledger.release_consumer(n) for n in self.names) if self.rank == 0 else 0
        # Doubles as a barrier: no rank leases before a restarted job's old leases are back.
        self.reclaimed = self.comm.broadcast(reclaimed, "get")
        if self.reclaimed:
            log.warning("returned %d unacked leases of a previous run to the queue", self.reclaimed)

    # -- RefStream ---------------------------------------------------------------------

    def get(self, max_items: int, timeout_s: float) -> list[SampleRef]:
        if self._exhausted or self._closed:
            return []
        payload = self._lead(max_items, timeout_s) if self.rank == 0 else None
        payload = self.comm.broadcast(payload, "get")
        if payload["error"] is not None:
            kind, message = payload["error"]
            raise (StreamSchemaError if kind == "schema" else RuntimeError)(message)
        self._exhausted = payload["exhausted"]
        refs = payload["refs"][self.rank]
        with self._lock:
            for ref in refs:
                self._held[ref.sample_id] = ref
        return refs

    def ack(self, refs: Sequence[SampleRef]) -> None:
        """Stage refs the loader handed over; ``commit`` makes them durable."""
        with self._lock:
            self._staged.extend(refs)

    def fail(self, refs: Sequence[SampleRef], retryable: bool) -> None:
        ids = {r.sample_id for r in refs}
        with self._lock:
            for sid in ids:
                self._held.pop(sid, None)
            self._staged = [r for r in self._staged if r.sample_id not in ids]
        if not retryable and ids:
            self.ledger.fail(self.consumer, sorted(ids), retryable=False)
        # Retryable: the lease stays ours until close() (or a restart) returns it in publish order.

    def exhausted(self) -> bool:
        return self._exhausted or self._closed

    # -- durable acks ------------------------------------------------------------------

    def commit(self, trained_ids: Sequence[str]) -> int:
        """Ack, durably and for every rank at once, the staged refs up to the last of ``trained_ids``.

        Collective: call it on every rank at the same optimizer boundary. Returns
        how many of this rank's refs became acked.
        """
        wanted = set(trained_ids)
        with self._lock:
            last = max((i for i, r in enumerate(self._staged) if r.sample_id in wanted), default=-1)
            done, self._staged = self._staged[: last + 1], self._staged[last + 1 :]
        mine = [r.sample_id for r in done]
        gathered = self.comm.all_gather(mine, "commit")
        error = None
        if self.rank == 0:
            union = [sid for part in gathered for sid in part]
            try:
                if union:
                    self.ledger.ack(self.consumer, union)
            except Exception as e:  # noqa: BLE001 - every rank must learn about it
                error = f"{type(e).__name__}: {e}"
        error = self.comm.broadcast(error, "commit")
        if error is not None:
            raise RuntimeError(f"durable ack on rank 0 failed: {error}")
        with self._lock:
            for sid in mine:
                self._held.pop(sid, None)
        if self.free_on_ack and self.store is not None:
            for sid in mine:
                self.store.abort(sid)
        self.committed += len(mine)
        return len(mine)

    def close(self) -> int:
        """Return every lease this rank (rank 0: every rank) still holds; returns how many."""
        if self._closed:
            return 0
        self._closed = True
        names = self.names if self.rank == 0 else [self.consumer]
        returned = sum(self.ledger.release_consumer(n) for n in names)
        self._buffer, self._staged, self._held = [], [], {}
        return returned

    def health(self) -> dict[str, int]:
        return {
            "held": len(self._held),
            "staged": len(self._staged),
            "committed": self.committed,
            "dropped": self.dropped,
            "reclaimed": self.reclaimed,
        }

    # -- rank 0 ------------------------------------------------------------------------

    def _empty(self, exhausted: bool = False, error: tuple[str, str] | None = None) -> dict[str, Any]:
        return {"refs": [[] for _ in range(self.world_size)], "exhausted": exhausted, "error": error}

    def _lead(self, max_items: int, timeout_s: float) -> dict[str, Any]:
        world = self.world_size
        deadline = time.monotonic() + max(timeout_s, 0.0)
        sleep = 0.005
        while True:
            failure = self.producer_error() if self.producer_error is not None else None
            if failure is not None:
                return self._empty(error=("producer", f"the feature producer failed: {failure!r}"))
            try:
                self._fill(max(max_items, 1) * world)
            except StreamSchemaError as e:
                return self._empty(error=("schema", str(e)))
            rounds = min(len(self._buffer) // world, max_items)
            if rounds:
                out, self._buffer = self._buffer[: rounds * world], self._buffer[rounds * world :]
                return {"refs": [out[r::world] for r in range(world)], "exhausted": False, "error": None}
            if self.ledger.is_done() and self.ledger.depth() == 0:
                self._drop_tail()
                return self._empty(exhausted=True)
            left = deadline - time.monotonic()
            if left <= 0:
                return self._empty()
            time.sleep(min(sleep, left))
            sleep = min(sleep * 2, self.poll_s)

    def _fill(self, want: int) -> None:
        world = self.world_size
        while len(self._buffer) < want:
            owner = len(self._buffer) % world
            count = want - len(self._buffer) if world == 1 else 1
            got = self.ledger.lease(self.names[owner], count, self.lease_s)
            if not got:
                return
            for ref in got:
                if self.check is not None:
                    try:
                        self.check(ref)
                    except StreamSchemaError:
                        self.ledger.fail(self.names[len(self._buffer) % world], [ref.sample_id], retryable=False)
                        raise
                self._buffer.append(ref)

    def _drop_tail(self) -> None:
        tail, self._buffer = self._buffer, []
        if not tail:
            return
        log.warning(
            "the stream ended with %d refs, fewer than one per rank (%d ranks): they are never trained",
            len(tail),
            self.world_size,
        )
        for i, ref in enumerate(tail):
            self.ledger.fail(self.names[i % self.world_size], [ref.sample_id], retryable=False)
            if self.store is not None:
                self.store.abort(ref.sample_id)
        self.dropped += len(tail)

