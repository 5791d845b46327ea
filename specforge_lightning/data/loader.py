"""FeatureDataLoader: SampleRefs in, TrainBatches out.

Offline, the loader walks a fixed ref list, sharded across ranks exactly like
``DistributedSampler(seed + epoch)``, and can resume mid-epoch from a
rank-keyed state. Online, it consumes a stream of refs once and acks them.
Either way each sample goes store.get -> clone -> store.release -> transform,
and a batch is collated from what survives.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from specforge_lightning.contracts import SampleRef, TrainBatch
from specforge_lightning.data.collate import pad_collate
from specforge_lightning.data.prefetch import Prefetcher, Work
from specforge_lightning.data.stores.base import FeatureStore

log = logging.getLogger(__name__)

STATE_VERSION = 1
ACK_MODES = ("on_yield", "manual")


def distributed_indices(n: int, world_size: int, rank: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The indices ``DistributedSampler(drop_last=False)`` gives ``rank`` in ``epoch``.

    Shuffle with ``randperm(n)`` seeded by ``seed + epoch``, pad by wrapping
    around to a multiple of ``world_size``, then take every world_size-th index.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if n == 0:
        return []
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        indices = torch.randperm(n, generator=g).tolist()
    else:
        indices = list(range(n))
    total = math.ceil(n / world_size) * world_size
    indices = (indices * math.ceil(total / n))[:total]
    return indices[rank:total:world_size]


@runtime_checkable
class RefStream(Protocol):
    """Where online refs come from (a ledger inbox, an in-process queue).

    ``get`` returns up to ``max_items`` refs, possibly fewer or none when
    ``timeout_s`` passes; ``exhausted()`` is True once the stream is closed and
    drained, which ends the loader's pass. ``ack`` marks refs trained;
    ``fail`` hands them back (``retryable``) or gives them up.
    """

    def get(self, max_items: int, timeout_s: float) -> list[SampleRef]: ...

    def ack(self, refs: Sequence[SampleRef]) -> None: ...

    def fail(self, refs: Sequence[SampleRef], retryable: bool) -> None: ...

    def exhausted(self) -> bool: ...


class FeatureDataLoader:
    """Turns SampleRefs into TrainBatches, from a fixed ref list or a stream.

    refs mode: re-iterable, one pass per ``iter()``, sharded like
    ``DistributedSampler(seed + epoch)``; ``seek``, ``state_dict`` and
    ``load_state_dict`` give exact mid-epoch resume. A sample whose
    ``transform`` returns None is skipped; a batch whose samples were all
    skipped is not yielded but still counts as a position.

    stream mode: consume-once. ``ack_mode="on_yield"`` acks a batch's refs as
    it is handed over; ``"manual"`` keeps them until the trainer calls
    ``ack_pending()`` at a durable optimizer boundary. A short final batch is
    yielded, or with ``drop_last`` failed for good and its features aborted.

    ``prefetch > 0`` materialises that many batches ahead on a thread.
    """

    def __init__(
        self,
        store: FeatureStore,
        *,
        refs: Sequence[SampleRef] | None = None,
        stream: RefStream | None = None,
        batch_size: int,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None,
        collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] = pad_collate,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        prefetch: int = 0,
        strategy: str = "",
        ack_mode: str = "on_yield",
        poll_timeout_s: float = 1.0,
    ) -> None:
        if (refs is None) == (stream is None):
            raise ValueError("FeatureDataLoader needs exactly one of refs= or stream=")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if ack_mode not in ACK_MODES:
            raise ValueError(f"ack_mode must be one of {ACK_MODES}, got {ack_mode!r}")
        self.store = store
        self.refs = tuple(refs) if refs is not None else None
        self.stream = stream
        self.batch_size = batch_size
        self.transform = transform
        self.collate = collate
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.strategy = strategy
        self.ack_mode = ack_mode
        self.poll_timeout_s = poll_timeout_s
        self.epoch = 0
        self.skipped_samples = 0
        self._stats_lock = threading.Lock()
        self._seek_pending = 0
        self._in_pass = False
        self._pass_epoch = 0
        self._batches_done = 0
        self._unacked: list[SampleRef] = []

    # -- positions ---------------------------------------------------------------------

    def _chunks(self, epoch: int) -> list[list[SampleRef]]:
        assert self.refs is not None
        order = distributed_indices(len(self.refs), self.world_size, self.rank, self.seed, epoch, self.shuffle)
        bs = self.batch_size
        chunks = [[self.refs[i] for i in order[j : j + bs]] for j in range(0, len(order), bs)]
        if self.drop_last and chunks and len(chunks[-1]) < bs:
            chunks.pop()
        return chunks

    def __len__(self) -> int:
        """Batches per pass for this rank (refs mode only)."""
        if self.refs is None:
            raise TypeError("a stream-mode FeatureDataLoader has no length")
        per_rank = math.ceil(len(self.refs) / self.world_size) if self.refs else 0
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of the next pass; a pending ``seek`` is kept."""
        self.epoch = epoch
        self._in_pass = False

    def seek(self, n_batches: int) -> None:
        """Make the next pass skip its first ``n_batches`` batches without fetching them (one-shot)."""
        if self.refs is None:
            raise RuntimeError("seek is not possible on a stream: its position lives in the ledger")
        if not 0 <= n_batches <= len(self):
            raise ValueError(f"cannot seek to batch {n_batches}: a pass has {len(self)} batches on rank {self.rank}")
        self._seek_pending = n_batches

    def state_dict(self) -> dict[str, Any]:
        """Rank-keyed position, so a gather across ranks merges by ``ranks``."""
        if self._in_pass:
            epoch, done = self._pass_epoch, self._batches_done
        else:
            epoch, done = self.epoch, self._seek_pending if self.refs is not None else self._batches_done
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "ranks": {str(self.rank): {"epoch": epoch, "batches_done": done, "seed": self.seed}},
        }
        if self.refs is not None:
            state["num_refs"] = len(self.refs)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch and position; refuse a state that would not replay the same samples."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, this loader reads {STATE_VERSION}")
        checks = [("world_size", self.world_size), ("batch_size", self.batch_size)]
        if self.refs is not None:
            checks.append(("num_refs", len(self.refs)))
        for key, ours in checks:
            if key in state and state[key] != ours:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]} but this run has {key}={ours}; "
                    "the data position cannot be restored"
                )
        ranks = state.get("ranks", {})
        mine = ranks.get(str(self.rank))
        if mine is None:
            raise ValueError(f"loader state has no entry for rank {self.rank} (it has ranks {sorted(ranks)})")
        if mine["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed={mine['seed']} but this run has seed={self.seed}")
        self.epoch = int(mine["epoch"])
        self._in_pass = False
        if self.refs is not None:
            self.seek(int(mine["batches_done"]))
        else:
            self._batches_done = int(mine["batches_done"])

    def ack_pending(self) -> int:
        """Ack every yielded but unacked ref (manual ack mode); returns how many."""
        refs, self._unacked = self._unacked, []
        if refs:
            assert self.stream is not None
            self.stream.ack(refs)
        return len(refs)

    # -- materialising -----------------------------------------------------------------

    def _fetch(self, ref: SampleRef) -> dict[str, torch.Tensor] | None:
        tensors, lease = self.store.get(ref)
        try:
            sample = {k: v.clone() for k, v in tensors.items()}
        finally:
            self.store.release(lease)
        return self.transform(sample) if self.transform is not None else sample

    def _strategy_of(self, refs: Sequence[SampleRef]) -> str:
        found = {r.strategy for r in refs if r.strategy}
        if self.strategy:
            if found - {self.strategy}:
                raise ValueError(f"loader for strategy {self.strategy!r} got refs of {sorted(found)}")
            return self.strategy
        if len(found) > 1:
            raise ValueError(f"one batch mixes strategies {sorted(found)}")
        return found.pop() if found else ""

    def _make(self, refs: list[SampleRef], metadata: dict[str, Any]) -> Work:
        strategy = self._strategy_of(refs)
        samples, ids, skipped = [], [], []
        for ref in refs:
            sample = self._fetch(ref)
            if sample is None:
                skipped.append(ref.sample_id)
            else:
                samples.append(sample)
                ids.append(ref.sample_id)
        if skipped:
            with self._stats_lock:
                self.skipped_samples += len(skipped)
        if not samples:
            return Work(None, refs)
        tensors = self.collate(samples)
        return Work(TrainBatch(ids, strategy, tensors, {**metadata, "skipped": skipped}), refs)

    def _drive(
        self, source_fn: Callable[[threading.Event], Iterator[Work]], on_drop: Callable[[Work], None] | None
    ) -> Iterator[Work]:
        if self.prefetch == 0:
            source = source_fn(threading.Event())
            try:
                yield from source
            finally:
                source.close()
        else:
            prefetcher = Prefetcher(source_fn, self.prefetch, on_drop)
            try:
                yield from prefetcher
            finally:
                prefetcher.close()

    # -- iteration ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[TrainBatch]:
        return self._iter_refs() if self.refs is not None else self._iter_stream()

    def _iter_refs(self) -> Iterator[TrainBatch]:
        epoch = self.epoch
        chunks = self._chunks(epoch)
        start, self._seek_pending = self._seek_pending, 0
        if start > len(chunks):
            raise ValueError(f"cannot seek to batch {start}: epoch {epoch} has {len(chunks)} batches")
        self._in_pass, self._pass_epoch, self._batches_done = True, epoch, start
        # The next pass is the next epoch even if this one is never exhausted: Lightning stops
        # calling next() once it has taken len(self) batches, so the end of the generator never runs.
        self.epoch = epoch + 1

        def source(stop: threading.Event) -> Iterator[Work]:
            for i in range(start, len(chunks)):
                if stop.is_set():
                    return
                yield self._make(chunks[i], {"epoch": epoch, "batch_index": i})

        drive = self._drive(source, on_drop=None)
        try:
            for work in drive:
                self._batches_done += 1
                if work.batch is not None:
                    yield work.batch
        finally:
            drive.close()
        self.epoch, self._batches_done, self._in_pass = epoch + 1, 0, False

    def _consume_once(self) -> bool:
        return bool(getattr(self.store, "consume_once", True))

    def _stream_source(self, stop: threading.Event) -> Iterator[Work]:
        assert self.stream is not None
        bs, pending, index = self.batch_size, [], 0
        try:
            while not stop.is_set():
                got = list(self.stream.get(bs - len(pending), self.poll_timeout_s))
                pending.extend(got)
                if len(pending) >= bs:
                    refs, pending = pending[:bs], pending[bs:]
                elif not got and self.stream.exhausted():
                    refs, pending = pending, []
                    if refs and self.drop_last:
                        self.stream.fail(refs, retryable=False)
                        for ref in refs:
                            self.store.abort(ref.sample_id)
                        refs = []
                    if not refs:
                        return
                else:
                    continue
                try:
                    work = self._make(refs, {"batch_index": index})
                except BaseException:
                    # Some samples may already be consumed from a consume-once store.
                    self.stream.fail(refs, retryable=not self._consume_once())
                    raise
                index += 1
                yield work
        finally:
            if pending:  # fetched from the stream but never materialised
                self.stream.fail(pending, retryable=True)

    def _give_back(self, work: Work) -> None:
        assert self.stream is not None
        self.stream.fail(work.refs, retryable=not self._consume_once())

    def _iter_stream(self) -> Iterator[TrainBatch]:
        assert self.stream is not None
        self._in_pass = False
        drive = self._drive(self._stream_source, on_drop=self._give_back)
        try:
            for work in drive:
                self._batches_done += 1
                if self.ack_mode == "on_yield":
                    self.stream.ack(work.refs)
                else:
                    self._unacked.extend(work.refs)
                if work.batch is not None:
                    yield work.batch
        finally:
            drive.close()
