"""In-process feature stores: a memory store for colocated online training and a
read-only store over prepared shard files for offline training."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.contracts import SampleRef
from specforge_lightning.data.stores import shards
from specforge_lightning.data.stores.base import FeatureStore, FeatureStoreError, Lease, Provenance, Tensors, make_ref


def nbytes_of(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_tensors(tensors: Mapping[str, torch.Tensor], sample_id: str) -> None:
    if not tensors:
        raise FeatureStoreError(f"put of sample {sample_id!r} without tensors")
    bad = {k: type(v).__name__ for k, v in tensors.items() if not isinstance(v, torch.Tensor)}
    if bad:
        raise FeatureStoreError(f"put of sample {sample_id!r}: features {bad} are not tensors")


@dataclass
class _Entry:
    tensors: dict[str, torch.Tensor]
    generation: int
    nbytes: int
    leases: set[int] = field(default_factory=set)


class LocalFeatureStore(FeatureStore):
    """Tensors in this process's memory, addressed as ``mem://{sample_id}``.

    A re-put of a sample id bumps its generation, and a ref of an older
    generation is refused. ``consume_once=True`` frees a sample when its last
    lease is released (online); otherwise samples stay until ``abort`` so
    epochs can repeat. ``max_resident_bytes`` caps memory: a put beyond it
    fails, which is the producer's signal that the consumer is behind. A lock
    guards everything, so a producer thread can put while the loader gets.
    """

    def __init__(self, max_resident_bytes: int | None = None, consume_once: bool = False) -> None:
        self.max_resident_bytes = max_resident_bytes
        self.consume_once = consume_once
        self._lock = threading.RLock()
        self._samples: dict[str, _Entry] = {}
        self._generations: dict[str, int] = {}  # survives frees, so a later re-put still bumps
        self._resident_bytes = 0
        self._lease_ids = itertools.count(1)
        self._counts = {"puts": 0, "gets": 0, "freed": 0, "aborted": 0}

    def _put(self, tensors: Tensors, sample_id: str, strategy: str, provenance: Provenance) -> SampleRef:
        check_tensors(tensors, sample_id)
        # Materialise a private copy (on the tensors' own device) first: the ref is
        # published only once the sample is whole, and a producer may reuse its buffers.
        owned = {k: v.detach().clone() for k, v in tensors.items()}
        nbytes = nbytes_of(owned)
        with self._lock:
            old = self._samples.get(sample_id)
            resident = self._resident_bytes - (old.nbytes if old else 0)
            if self.max_resident_bytes is not None and resident + nbytes > self.max_resident_bytes:
                raise FeatureStoreError(
                    f"put of sample {sample_id!r} ({nbytes} bytes) would exceed max_resident_bytes="
                    f"{self.max_resident_bytes} ({resident} bytes resident in {len(self._samples)} samples); "
                    "the consumer is behind"
                )
            generation = self._generations.get(sample_id, 0) + 1
            self._generations[sample_id] = generation
            self._samples[sample_id] = _Entry(owned, generation, nbytes)
            self._resident_bytes = resident + nbytes
            self._counts["puts"] += 1
        return make_ref(owned, sample_id, f"mem://{sample_id}", strategy=strategy, generation=generation, provenance=provenance)

    def get(self, ref: SampleRef) -> tuple[dict[str, torch.Tensor], Lease]:
        """The stored tensors themselves (not copies): the caller clones before ``release``."""
        if not ref.store_uri.startswith("mem://"):
            raise FeatureStoreError(f"LocalFeatureStore cannot read {ref.store_uri!r} (sample {ref.sample_id!r})")
        with self._lock:
            entry = self._samples.get(ref.sample_id)
            if entry is None:
                raise FeatureStoreError(
                    f"sample {ref.sample_id!r} is not resident (consumed, aborted or never put in this store)"
                )
            if entry.generation != ref.generation:
                raise FeatureStoreError(
                    f"stale ref for sample {ref.sample_id!r}: ref generation {ref.generation}, "
                    f"store holds generation {entry.generation}"
                )
            missing = [k for k in ref.feature_keys.values() if k not in entry.tensors]
            if missing:
                raise FeatureStoreError(f"sample {ref.sample_id!r} has no features {missing}")
            lease_id = next(self._lease_ids)
            entry.leases.add(lease_id)
            self._counts["gets"] += 1
            out = {name: entry.tensors[key] for name, key in ref.feature_keys.items()}
        return out, Lease(ref.sample_id, entry.generation, handle=lease_id)

    def release(self, lease: Lease) -> None:
        """End a lease; a stale or repeated release is a no-op."""
        with self._lock:
            entry = self._samples.get(lease.sample_id)
            if entry is None or entry.generation != lease.generation or lease.handle not in entry.leases:
                return
            entry.leases.discard(lease.handle)
            if self.consume_once and not entry.leases:
                self._drop(lease.sample_id)
                self._counts["freed"] += 1

    def abort(self, sample_id: str) -> None:
        with self._lock:
            if sample_id in self._samples:
                self._drop(sample_id)
                self._counts["aborted"] += 1

    def _drop(self, sample_id: str) -> None:
        entry = self._samples.pop(sample_id)
        self._resident_bytes -= entry.nbytes

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ok": True,
                "resident_samples": len(self._samples),
                "resident_bytes": self._resident_bytes,
                "leased_samples": sum(1 for e in self._samples.values() if e.leases),
                "max_resident_bytes": self.max_resident_bytes,
                "consume_once": self.consume_once,
                **self._counts,
            }

    def close(self) -> None:
        with self._lock:
            self._samples.clear()
            self._resident_bytes = 0


class PreparedShardStore(FeatureStore):
    """Read-only store over prepared shard files under ``root`` (``shard://`` refs).

    Open file handles are cached per shard; each handle is used under its own
    lock, so a prefetch thread and the main thread can read at once. Release
    is a no-op: prepared samples are read again every epoch.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FeatureStoreError(f"prepared feature folder {self.root} does not exist")
        self._lock = threading.Lock()
        self._handles: dict[Path, tuple[Any, threading.Lock]] = {}
        self._gets = 0

    def refs(self, split_files: Sequence[str | Path] | None = None) -> list[SampleRef]:
        """Refs of every shard under root (sorted), or of ``split_files`` (relative to root) in order."""
        if split_files is None:
            files = sorted(self.root.rglob(f"*{shards.SHARD_SUFFIX}"))
            files = [f for f in files if not f.name.startswith(".")]
        else:
            files = [self.root / f for f in split_files]
        return [ref for f in files for ref in shards.read_shard_index(f)]

    def _handle(self, path: Path) -> tuple[Any, threading.Lock]:
        with self._lock:
            cached = self._handles.get(path)
        if cached is not None:
            return cached
        handle = shards.open_shard(path)  # opened outside the store lock: it reads a header from disk
        with self._lock:
            return self._handles.setdefault(path, (handle, threading.Lock()))

    def _put(self, tensors: Tensors, sample_id: str, strategy: str, provenance: Provenance) -> SampleRef:
        raise FeatureStoreError(f"PreparedShardStore({self.root}) is read-only; cannot put sample {sample_id!r}")

    def get(self, ref: SampleRef) -> tuple[dict[str, torch.Tensor], Lease]:
        path, sample_id = shards.parse_shard_uri(ref.store_uri)
        if sample_id != ref.sample_id:
            raise FeatureStoreError(f"ref {ref.sample_id!r} points at sample {sample_id!r} ({ref.store_uri})")
        if not path.resolve().is_relative_to(self.root):
            raise FeatureStoreError(f"shard {path} of sample {ref.sample_id!r} is outside the store root {self.root}")
        handle, lock = self._handle(path)
        with lock:
            tensors = shards.read_tensors(path, handle, ref.feature_keys)
        with self._lock:
            self._gets += 1
        return tensors, Lease(ref.sample_id, ref.generation)

    def release(self, lease: Lease) -> None:
        """Nothing to free: prepared shards are read-only and re-read every epoch."""

    def abort(self, sample_id: str) -> None:
        """Nothing to drop: the store never deletes prepared files."""

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"ok": True, "root": str(self.root), "open_files": len(self._handles), "gets": self._gets}

    def close(self) -> None:
        with self._lock:
            self._handles.clear()
