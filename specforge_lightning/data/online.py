"""Online data plane: features that arrive while training runs.

- :func:`capture_in_order` runs a target engine over tasks with exactly the batching
  ``prepare`` uses (chunks of ``shard_size`` tasks, length-sorted batches inside a chunk),
  so an online sample is bit-identical to its offline twin.
- :class:`RankedLedgerStream` is one trainer rank's RefStream over a Ledger. Rank 0
  leases for every rank, round-robin, and hands out whole rounds, so rank r sees the
  samples ``DistributedSampler`` would give it and every rank gets the same number of
  batches (no DDP hang at the end). Acks are staged and committed durably at optimizer
  boundaries in one ledger transaction for all ranks.
- :class:`ColocatedRefSource` runs the target on a background thread into a
  consume-once LocalFeatureStore and exposes a RefStream; it can also save what it
  captured as prepared shards ("generate once, reuse").
- :class:`StoreSpec` / :func:`build_store` describe and open the store a producer and
  its trainers share (shared directory or Mooncake).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from specforge_lightning.contracts import SCHEMA_VERSION, PromptTask, SampleRef
from specforge_lightning.control.ledger import Backpressure, InMemoryLedger, Ledger
from specforge_lightning.data.loader import distributed_indices
from specforge_lightning.data.shards import write_shard
from specforge_lightning.data.stores.base import FeatureStore, FeatureStoreError
from specforge_lightning.data.stores.local import LocalFeatureStore, nbytes_of

log = logging.getLogger(__name__)


class StreamSchemaError(ValueError):
    """A streamed sample does not match the stream's manifest (schema version, features, shapes, dtypes)."""


# --------------------------------------------------------------------------- stores


@dataclass
class StoreSpec:
    """Which store a producer and its trainers share.

    ``kind``: ``shared_dir`` (``root``, a folder every process sees) or ``mooncake``
    (``master_address``, ``metadata_server``; env ``MOONCAKE_MASTER_SERVER_ADDR`` /
    ``MOONCAKE_METADATA_SERVER`` fill them when unset). The shared secret of a shared
    directory comes from ``token`` or, better, the environment variable ``token_env``.
    ``max_resident_bytes`` caps a shared directory (the producer waits when it is full).
    Mooncake objects live in the segments clients lend: by default the producer lends
    ``producer_segment_bytes`` and waits for the stream to drain before it exits.
    """

    kind: str = "shared_dir"
    root: str | None = None
    token: str | None = None
    token_env: str = "SPECFORGE_STORE_TOKEN"
    max_resident_bytes: int | None = None
    master_address: str | None = None
    metadata_server: str | None = None
    prefix: str = "specforge"
    segment_bytes: int = 0
    producer_segment_bytes: int = 256 << 20
    local_buffer_bytes: int = 64 << 20
    staging_bytes: int = 16 << 20


def build_store(spec: StoreSpec, *, consume_once: bool, producer: bool = False) -> FeatureStore:
    """Open the store ``spec`` names. Trainers use ``consume_once=False`` and free after the durable ack."""
    if spec.kind == "shared_dir":
        if not spec.root:
            raise ValueError("store.kind=shared_dir needs store.root (a folder the producer and trainers share)")
        from specforge_lightning.data.stores.shared_dir import SharedDirFeatureStore

        token = spec.token or os.environ.get(spec.token_env) or None
        return SharedDirFeatureStore(
            spec.root, consume_once=consume_once, max_resident_bytes=spec.max_resident_bytes, token=token
        )
    if spec.kind == "mooncake":
        from specforge_lightning.data.stores.mooncake import MooncakeFeatureStore

        master = spec.master_address or os.environ.get("MOONCAKE_MASTER_SERVER_ADDR", "")
        metadata = spec.metadata_server or os.environ.get("MOONCAKE_METADATA_SERVER", "")
        if not master or not metadata:
            raise ValueError(
                "store.kind=mooncake needs store.master_address and store.metadata_server "
                "(or MOONCAKE_MASTER_SERVER_ADDR / MOONCAKE_METADATA_SERVER)"
            )
        return MooncakeFeatureStore(
            master,
            metadata,
            prefix=spec.prefix,
            segment_bytes=spec.producer_segment_bytes if producer else spec.segment_bytes,
            local_buffer_bytes=spec.local_buffer_bytes,
            staging_bytes=spec.staging_bytes,
            consume_once=consume_once,
        )
    raise ValueError(f"unknown store kind {spec.kind!r}; use 'shared_dir' or 'mooncake'")


def _store_full(error: FeatureStoreError) -> bool:
    text = str(error)
    return "max_resident_bytes" in text or "no space left" in text


def put_with_retry(
    store: FeatureStore,
    tensors: Mapping[str, torch.Tensor],
    sample_id: str,
    *,
    strategy: str = "",
    provenance: Mapping[str, Any] | None = None,
    retry_s: float = 600.0,
    should_stop: Callable[[], bool] | None = None,
) -> SampleRef:
    """``store.put``, waiting while the store is full (consumers free space as they ack).

    A sample larger than the whole cap can never fit: that is an error at once.
    """
    cap = getattr(store, "max_resident_bytes", None)
    nbytes = nbytes_of(tensors)
    if cap is not None and nbytes > cap:
        raise FeatureStoreError(
            f"sample {sample_id!r} needs {nbytes} bytes but the store's max_resident_bytes is {cap}: it can never fit"
        )
    deadline = time.monotonic() + retry_s
    sleep = 0.01
    while True:
        try:
            return store.put(tensors, sample_id, strategy=strategy, provenance=provenance)
        except FeatureStoreError as e:
            if not _store_full(e):
                raise
            if time.monotonic() >= deadline:
                raise FeatureStoreError(f"the store stayed full for {retry_s:.0f} s; last refusal: {e}") from e
            if should_stop is not None and should_stop():
                raise InterruptedError(f"stopped while waiting for store space for {sample_id!r}") from e
            time.sleep(sleep)
            sleep = min(sleep * 2, 0.2)


# --------------------------------------------------------------------------- capture


class CaptureEngine(Protocol):
    def capture(self, tasks: Sequence[PromptTask], layer_ids: Sequence[int]) -> list[dict[str, torch.Tensor]]: ...


def has_nan(features: Mapping[str, torch.Tensor]) -> bool:
    return any(v.is_floating_point() and bool(torch.isnan(v).any()) for v in features.values())


def capture_in_order(
    engine: CaptureEngine,
    tasks: Sequence[PromptTask],
    layer_ids: Sequence[int],
    *,
    chunk_size: int,
    batch_size: int,
    start: int = 0,
    stop: threading.Event | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor] | None]]:
    """Yield ``(position, features)`` for positions ``>= start``, in task order.

    Batching is prepare's: the task list is cut into chunks of ``chunk_size``, each
    chunk is captured in batches of ``batch_size`` after a stable sort by length. A
    chunk holding ``start`` is captured whole, so resumed features equal the original
    ones. Features with a NaN come back as None (the caller drops them, as prepare does).
    """
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size}, {batch_size}")
    first = (start // chunk_size) * chunk_size
    for lo in range(first, len(tasks), chunk_size):
        chunk = tasks[lo : lo + chunk_size]
        order = sorted(range(len(chunk)), key=lambda i: chunk[i].num_tokens)
        captured: dict[int, dict[str, torch.Tensor]] = {}
        for b in range(0, len(order), batch_size):
            if stop is not None and stop.is_set():
                return
            idx = order[b : b + batch_size]
            for i, feats in zip(idx, engine.capture([chunk[i] for i in idx], layer_ids)):
                captured[i] = feats
        for i in range(len(chunk)):
            if lo + i >= start:
                feats = captured[i]
                yield lo + i, None if has_nan(feats) else feats


# --------------------------------------------------------------------------- ref checks


def expected_features(manifest: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Trailing shape and dtype of each captured feature, from a stream or prepare manifest."""
    hidden = int(manifest["hidden_size"])
    dtype = str(manifest["capture_dtype"])
    return {
        "input_ids": ((), "int64"),
        "loss_mask": ((), "int64"),
        "aux_hidden_states": ((len(manifest["layer_ids"]) * hidden,), dtype),
        "last_hidden_state": ((hidden,), dtype),
        "target_top1": ((), "int64"),  # optional: older feature sets lack it
    }


OPTIONAL_FEATURES = ("target_top1",)


class RefCheck:
    """Refuses refs that do not match the stream's manifest, before any tensor is fetched."""

    def __init__(self, manifest: Mapping[str, Any], required: Sequence[str] | None = None) -> None:
        self.schema_version = int(manifest.get("schema_version", SCHEMA_VERSION))
        self.max_length = int(manifest.get("max_length") or 0)
        self.expected = expected_features(manifest)
        self.required = tuple(required) if required else tuple(k for k in self.expected if k not in OPTIONAL_FEATURES)

    def __call__(self, ref: SampleRef) -> None:
        where = f"sample {ref.sample_id!r}"
        if ref.schema_version != self.schema_version or ref.schema_version != SCHEMA_VERSION:
            raise StreamSchemaError(
                f"{where} has schema_version {ref.schema_version}; the stream announces {self.schema_version} "
                f"and this trainer reads {SCHEMA_VERSION}"
            )
        missing = [name for name in self.required if name not in ref.feature_keys]
        if missing:
            raise StreamSchemaError(f"{where} lacks features {missing} (it has {sorted(ref.feature_keys)})")
        specs = {s.name: s for s in ref.feature_specs}
        lengths = set()
        present = [name for name in OPTIONAL_FEATURES if name in ref.feature_keys and name not in self.required]
        for name in (*self.required, *present):
            spec = specs.get(name)
            if spec is None:
                raise StreamSchemaError(f"{where} has no shape/dtype spec for feature {name!r}")
            tail, dtype = self.expected.get(name, (None, None))
            if tail is None:
                continue
            if len(spec.shape) != 1 + len(tail) or tuple(spec.shape[1:]) != tail or spec.dtype != dtype:
                raise StreamSchemaError(
                    f"{where}: feature {name!r} is {list(spec.shape)} {spec.dtype}, the stream announces "
                    f"[L, {', '.join(map(str, tail))}] {dtype}".replace(", ]", "]")
                )
            lengths.add(spec.shape[0])
        if len(lengths) > 1:
            raise StreamSchemaError(f"{where}: features disagree on the sequence length: {sorted(lengths)}")
        if self.max_length and lengths and max(lengths) > self.max_length:
            raise StreamSchemaError(f"{where} has {max(lengths)} tokens, over the stream's max_length {self.max_length}")


# --------------------------------------------------------------------------- rank coordination


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
        import torch.distributed as dist

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


# --------------------------------------------------------------------------- the stream


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


# --------------------------------------------------------------------------- colocated


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def epoch_sample_ids(tasks: Sequence[PromptTask], order: Sequence[int], epoch: int) -> list[str]:
    """Sample ids of one epoch: the task id (epoch 0) or ``{task_id}@e{epoch}``; repeats get ``#k``."""
    seen: dict[str, int] = {}
    out = []
    for i in order:
        sid = tasks[i].task_id if epoch == 0 else f"{tasks[i].task_id}@e{epoch}"
        k = seen.get(sid, 0)
        seen[sid] = k + 1
        out.append(sid if k == 0 else f"{sid}#{k}")
    return out


class ColocatedRefSource:
    """The target runs in this process, on a background thread, never in the training step.

    Captured samples go into a consume-once LocalFeatureStore and their refs into an
    in-memory ledger; ``stream`` is the RefStream for ``FeatureDataLoader(stream=...)``.
    The thread pauses while ``high_watermark`` refs are queued (until fewer than
    ``low_watermark``) and while the store is over ``max_resident_bytes``.

    Rank ``rank`` of ``world_size`` captures the tasks ``DistributedSampler`` would give
    it (``shuffle``/``seed`` per epoch). With one rank and no shuffle the batching equals
    prepare's, so the features are bit-identical to prepared shards. ``save_dir`` (one
    rank, no shuffle) also writes epoch 0 as prepared shards plus ``manifest.json``
    (``manifest`` supplies the identity fields), so a later run can train offline on it.
    """

    def __init__(
        self,
        engine: CaptureEngine,
        tasks: Sequence[PromptTask],
        layer_ids: Sequence[int],
        *,
        batch_size: int = 8,
        chunk_size: int = 64,
        strategy: str = "",
        provenance: Mapping[str, Any] | None = None,
        high_watermark: int = 32,
        low_watermark: int = 16,
        max_resident_bytes: int | None = None,
        epochs: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        save_dir: str | Path | None = None,
        manifest: Mapping[str, Any] | None = None,
        check: Callable[[SampleRef], None] | None = None,
    ) -> None:
        if save_dir is not None and (world_size != 1 or shuffle):
            raise ValueError("save_dir needs one rank without shuffle (the shards must hold every task in order)")
        if save_dir is not None and manifest is None:
            raise ValueError("save_dir needs the manifest identity fields (manifest=...)")
        self.engine = engine
        self.tasks = list(tasks)
        self.layer_ids = list(layer_ids)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.strategy = strategy
        self.provenance = dict(provenance or {})
        self.epochs = epochs
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.manifest = dict(manifest or {})
        self.store = LocalFeatureStore(max_resident_bytes=max_resident_bytes, consume_once=True)
        self.ledger = InMemoryLedger()
        self.backpressure = Backpressure(self.ledger, high_watermark, low_watermark, poll_s=0.01)
        self.stream = RankedLedgerStream(
            self.ledger, "colocated", store=self.store, check=check, producer_error=lambda: self.error
        )
        self.error: BaseException | None = None
        self.published = 0
        self.nan_skipped = 0
        self.capture_s = 0.0
        self.paused_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = 0.0

    def start(self) -> ColocatedRefSource:
        if self._thread is None:
            self._started_at = time.monotonic()
            # The capture thread's intra-op pool matches the caller's, whatever other threads
            # (a loader's prefetcher runs on one) set before it starts.
            threads = torch.get_num_threads()
            self._thread = threading.Thread(
                target=self._run, args=(threads,), name="colocated-capture", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("colocated capture thread did not stop within %.0f s", timeout_s)
        self.stream.close()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def health(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._started_at if self._started_at else 0.0
        return {
            **self.ledger.counts(),
            "queue_depth": self.ledger.depth(),
            "producer_samples_per_s": self.published / elapsed if elapsed > 0 else 0.0,
            "producer_paused_s": self.paused_s,
            "producer_capture_s": self.capture_s,
            "nan_skipped": self.nan_skipped,
            "resident_bytes": self.store.health()["resident_bytes"],
        }

    # -- the capture thread -------------------------------------------------------------

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            if self.save_dir is not None:
                self._begin_save()
            for epoch in range(self.epochs):
                order = distributed_indices(
                    len(self.tasks), self.world_size, self.rank, self.seed, epoch, self.shuffle
                )
                ordered = [self.tasks[i] for i in order]
                ids = epoch_sample_ids(self.tasks, order, epoch)
                saving = self.save_dir is not None and epoch == 0
                self._capture_epoch(ordered, ids, saving)
                if self._stop.is_set():
                    return
            if self.save_dir is not None:
                self._finish_save()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer through the stream
            if not isinstance(e, InterruptedError):
                log.exception("colocated capture failed")
                self.error = e
        finally:
            self.ledger.mark_done()

    def _capture_epoch(self, ordered: list[PromptTask], ids: list[str], saving: bool) -> None:
        pending: list[tuple[str, dict[str, torch.Tensor]]] = []
        t0 = time.monotonic()
        for pos, feats in capture_in_order(
            self.engine, ordered, self.layer_ids, chunk_size=self.chunk_size, batch_size=self.batch_size,
            stop=self._stop,
        ):
            self.capture_s += time.monotonic() - t0
            if feats is None:
                self.nan_skipped += 1
            else:
                if saving:
                    pending.append((ordered[pos].task_id, feats))
                self._publish(ids[pos], feats)
            if saving and (pos % self.chunk_size == self.chunk_size - 1 or pos == len(ordered) - 1):
                self._save_shard(pos // self.chunk_size, pending)
                pending = []
            if self._stop.is_set():
                return
            t0 = time.monotonic()

    def _publish(self, sample_id: str, feats: dict[str, torch.Tensor]) -> None:
        t0 = time.monotonic()
        while not self.backpressure.wait_below(timeout=0.2):
            if self._stop.is_set():
                raise InterruptedError("stopped")
        ref = put_with_retry(
            self.store, feats, sample_id, strategy=self.strategy, provenance=self.provenance,
            should_stop=self._stop.is_set,
        )
        self.paused_s += time.monotonic() - t0
        self.ledger.publish([ref])
        self.published += 1

    # -- generate once, reuse ------------------------------------------------------------

    def _begin_save(self) -> None:
        assert self.save_dir is not None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.manifest.setdefault("splits", {})
        self.manifest["complete"] = False
        self._train_shards: list[str] = []
        _write_json_atomic(self.save_dir / "manifest.json", self.manifest)

    def _save_shard(self, index: int, samples: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
        assert self.save_dir is not None
        if not samples:  # every sample of the chunk had a NaN
            return
        rel = f"train/shard_{index:05d}.safetensors"
        write_shard(self.save_dir / rel, samples, {"split": "train", "target": str(self.manifest.get("target", ""))})
        self._train_shards.append(rel)

    def _finish_save(self) -> None:
        assert self.save_dir is not None
        self.manifest["splits"]["train"] = {
            "shards": self._train_shards,
            "num_samples": len(self.tasks),
            "num_tokens": sum(t.num_tokens for t in self.tasks),
            "num_supervised": sum(t.num_supervised for t in self.tasks),
        }
        self.manifest["nan_skipped"] = self.manifest.get("nan_skipped", 0) + self.nan_skipped
        self.manifest["complete"] = True
        _write_json_atomic(self.save_dir / "manifest.json", self.manifest)
        log.info("saved the captured features as prepared shards in %s", self.save_dir)
