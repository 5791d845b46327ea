"""FeatureStore over Mooncake's distributed KV store: features cross machines without files.

Layout: one Mooncake object per tensor, key ``{prefix}/{sample_id}/g{generation}/{feature}``,
value = the tensor's raw contiguous bytes, no header. Shape and dtype travel in the
SampleRef's FeatureSpecs, so any process can rebuild the tensor (bf16 included: bytes
move through a ``uint8`` view, never through numpy dtypes).

Objects are hard-pinned (never evicted): this store is the only lifetime authority.
They are freed by ``release`` (consume-once) or ``abort``, with ``force=True``,
because Mooncake grants a reader a short lease on every lookup and an ordinary
remove fails (-706) while it lasts.

Data path: ``mooncake_io.py`` (one registered staging buffer, one batch put/get per sample).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specforge_lightning.contracts import SampleRef
from specforge_lightning.data.stores.base import FeatureStore, FeatureStoreError, Lease, Provenance, Tensors, specs_of
from specforge_lightning.data.stores.mooncake_io import (
    MIN_SEGMENT_BYTES,
    connect,
    dtype_of,
    explain,
    nbytes_of,
    read_objects,
    tensor_bytes,
    write_objects,
)

URI_SCHEME = "mooncake://"


@dataclass
class _Live:
    """A sample generation this process wrote or read and has not freed."""

    generation: int
    keys: tuple[str, ...]
    leases: int = 0


class MooncakeFeatureStore(FeatureStore):
    """Feature tensors in a Mooncake cluster; refs are ``mooncake://{sample_id}``.

    ``segment_bytes`` is the memory this client lends to the cluster (0 for a pure
    producer whose data should live in consumers' segments; else >= 16 MiB).
    ``consume_once=True`` (online streams) frees a sample's objects on ``release``;
    ``False`` keeps them for re-iterable offline use, freed only by ``abort``.
    """

    def __init__(
        self,
        master_address: str,
        metadata_server: str,
        *,
        prefix: str = "sfl",
        segment_bytes: int = 512 << 20,
        local_buffer_bytes: int = 64 << 20,
        staging_bytes: int = 64 << 20,
        protocol: str = "tcp",
        rdma_devices: str = "",
        local_hostname: str = "127.0.0.1",
        consume_once: bool = True,
        remember: int = 100_000,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if 0 < segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be 0 or >= {MIN_SEGMENT_BYTES} (Mooncake's minimum): {segment_bytes}")
        if "/" in prefix or not prefix:
            raise ValueError(f"prefix must be a non-empty string without '/', got {prefix!r}")
        conn = connect(
            master_address,
            metadata_server,
            segment_bytes=segment_bytes,
            local_buffer_bytes=local_buffer_bytes,
            staging_bytes=staging_bytes,
            protocol=protocol,
            rdma_devices=rdma_devices,
            local_hostname=local_hostname,
            connect_timeout_s=connect_timeout_s,
        )
        self.prefix = prefix
        self.master_address = master_address
        self.metadata_server = metadata_server
        self.consume_once = consume_once
        self._lock = threading.RLock()
        self._client = conn.client
        self._config = conn.config
        self._staging: torch.Tensor | None = conn.staging
        # Bookkeeping, both bounded by ``remember`` (oldest forgotten first): samples this
        # process put or read and has not freed, and the newest freed generation per sample.
        self._live: OrderedDict[str, _Live] = OrderedDict()
        self._freed: OrderedDict[str, int] = OrderedDict()
        self._remember = remember
        self._closed = False

    @classmethod
    def from_env(cls, **overrides: Any) -> MooncakeFeatureStore:
        """Build from ``MOONCAKE_MASTER_SERVER_ADDR`` / ``MOONCAKE_METADATA_SERVER`` (and friends)."""
        env = os.environ
        kwargs: dict[str, Any] = {
            "master_address": env.get("MOONCAKE_MASTER_SERVER_ADDR", ""),
            "metadata_server": env.get("MOONCAKE_METADATA_SERVER", ""),
            "protocol": env.get("MOONCAKE_PROTOCOL", "tcp"),
            "rdma_devices": env.get("MOONCAKE_RDMA_DEVICES", ""),
            "local_hostname": env.get("MOONCAKE_LOCAL_HOSTNAME", "127.0.0.1"),
        }
        sizes = {"segment_bytes": "MOONCAKE_GLOBAL_SEGMENT_SIZE", "local_buffer_bytes": "MOONCAKE_LOCAL_BUFFER_SIZE"}
        for key, var in sizes.items():
            if var in env:
                kwargs[key] = int(env[var])
        kwargs.update(overrides)
        if not kwargs["master_address"] or not kwargs["metadata_server"]:
            raise ValueError("set MOONCAKE_MASTER_SERVER_ADDR and MOONCAKE_METADATA_SERVER (or pass them)")
        return cls(**kwargs)

    # ------------------------------------------------------------------ keys
    def key(self, sample_id: str, generation: int, feature: str) -> str:
        return f"{self.prefix}/{sample_id}/g{generation}/{feature}"

    @property
    def zero_copy(self) -> bool:
        return self._staging is not None

    @property
    def client(self) -> Any:
        """The underlying ``MooncakeDistributedStore`` (for benchmarks and diagnostics)."""
        return self._client

    # ------------------------------------------------------------------ put
    def _put(self, tensors: Tensors, sample_id: str, strategy: str, provenance: Provenance) -> SampleRef:
        """Write every tensor of a sample, or none: a failed put removes what it wrote, then raises."""
        if not tensors:
            raise FeatureStoreError(f"sample {sample_id}: nothing to put")
        if "/" in sample_id:
            raise FeatureStoreError(f"sample id {sample_id!r} must not contain '/'")
        specs = specs_of(tensors)
        for s in specs:
            dtype_of(s.dtype)  # refuse unsupported dtypes before writing anything
        raw = {name: tensor_bytes(t) for name, t in tensors.items()}
        with self._lock:
            self._check_open()
            live = self._live.get(sample_id)
            generation = max(live.generation if live else -1, self._freed.get(sample_id, -1)) + 1
            keys = {s.name: self.key(sample_id, generation, s.name) for s in specs}
            # Mooncake keeps the first object under a key and reports success on a second
            # put, so a collision (another producer with the same prefix) must be caught here.
            flags = self._client.batch_is_exist(list(keys.values()))
            present = [k for k, flag in zip(keys.values(), flags) if flag == 1]
            if present:
                raise FeatureStoreError(
                    f"sample {sample_id} g{generation}: keys already exist in Mooncake ({present[0]}, ...); "
                    f"is another producer using prefix {self.prefix!r}?"
                )
            written: list[str] = []
            try:
                items = [(keys[s.name], raw[s.name]) for s in specs]
                write_objects(self._client, self._config, self._staging, items, written)
            except BaseException:
                self._remove(written)
                raise
            if live:  # a re-put supersedes the previous generation
                self._remove(live.keys)
                self._mark_freed(sample_id, live.generation)
            self._track(sample_id, _Live(generation, tuple(keys.values())))
        return SampleRef(
            sample_id=sample_id,
            store_uri=f"{URI_SCHEME}{sample_id}",
            feature_keys=keys,
            feature_specs=specs,
            strategy=strategy,
            generation=generation,
            num_tokens=int(tensors["input_ids"].shape[-1]) if "input_ids" in tensors else 0,
            provenance=dict(provenance or {}),
        )

    # ------------------------------------------------------------------ get
    def get(self, ref: SampleRef) -> tuple[dict[str, torch.Tensor], Lease]:
        """Fresh tensors (already copies) plus a lease; stale or freed refs raise FeatureStoreError."""
        if not ref.store_uri.startswith(URI_SCHEME):
            raise FeatureStoreError(f"sample {ref.sample_id}: {ref.store_uri!r} is not a mooncake:// ref")
        sid, gen = ref.sample_id, ref.generation
        with self._lock:
            self._check_open()
            live = self._live.get(sid)
            if live and gen < live.generation:
                raise FeatureStoreError(f"sample {sid}: ref generation {gen} is stale (current: {live.generation})")
            if gen <= self._freed.get(sid, -1):
                raise FeatureStoreError(f"sample {sid} g{gen} was already released, aborted or superseded")
            specs = [ref.spec(name) for name in ref.feature_keys]
            items = [(ref.feature_keys[s.name], s, nbytes_of(s)) for s in specs]
            out = read_objects(self._client, self._staging, sid, gen, items)
            keys = tuple(k for k, _, _ in items)
            if live is None or live.generation != gen:
                live = _Live(gen, keys)
            live.leases += 1
            self._track(sid, live)
        return out, Lease(sample_id=sid, generation=gen, handle=keys)

    # ------------------------------------------------------------ release
    def release(self, lease: Lease) -> None:
        """End a lease; in consume-once mode the last lease on the current generation frees the objects."""
        with self._lock:
            sid, gen = lease.sample_id, lease.generation
            live = self._live.get(sid)
            if self._closed or gen <= self._freed.get(sid, -1) or (live and live.generation > gen):
                return  # already freed or superseded: nothing to do
            if live is not None and live.generation == gen:
                live.leases -= 1
                if live.leases > 0:
                    return
                live.leases = 0
            if self.consume_once:  # (a live entry may have been forgotten; the lease still names the keys)
                keys = tuple(lease.handle or (live.keys if live else ()))
                self._live.pop(sid, None)
                self._mark_freed(sid, gen)
                self._remove(keys, strict=True)

    def abort(self, sample_id: str) -> None:
        """Drop a sample that will never be consumed (its known generation, else every one, by key pattern)."""
        with self._lock:
            self._check_open()
            live = self._live.pop(sample_id, None)
            if live:
                self._mark_freed(sample_id, live.generation)
                self._remove(live.keys, strict=True)
                return
            pattern = f"^{re.escape(self.prefix)}/{re.escape(sample_id)}/g[0-9]+/"
            rc = self._client.remove_by_regex(pattern, True)
            if rc < 0:
                raise FeatureStoreError(f"abort of sample {sample_id} failed: {explain(rc)}")

    def _track(self, sid: str, live: _Live) -> None:
        self._live[sid] = live
        self._live.move_to_end(sid)
        while len(self._live) > self._remember:
            self._live.popitem(last=False)

    def _mark_freed(self, sid: str, gen: int) -> None:
        self._freed[sid] = max(gen, self._freed.get(sid, -1))
        self._freed.move_to_end(sid)
        while len(self._freed) > self._remember:
            self._freed.popitem(last=False)

    def _remove(self, keys: Sequence[str], strict: bool = False) -> None:
        if not keys:
            return
        codes = self._client.batch_remove(list(keys), True)
        bad = [(k, rc) for k, rc in zip(keys, codes) if rc not in (0, -704)]
        if bad and strict:
            raise FeatureStoreError(f"removing {bad[0][0]} failed: {explain(bad[0][1])}")

    # ------------------------------------------------------------ lifecycle
    def health(self) -> dict[str, Any]:
        with self._lock:
            rc = 1 if self._closed else self._client.health_check()
            return {
                "ok": rc == 0,
                "backend": "mooncake",
                "status": {0: "healthy", 1: "closed", 2: "master unreachable"}.get(rc, f"rc={rc}"),
                "master": self.master_address,
                "prefix": self.prefix,
                "zero_copy": self.zero_copy,
                "live_samples": len(self._live),
                "open_leases": sum(e.leases for e in self._live.values()),
            }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._staging is not None:
                self._client.unregister_buffer(self._staging.data_ptr())
            self._client.close()
            self._staging = None

    def _check_open(self) -> None:
        if self._closed:
            raise FeatureStoreError("the Mooncake store is closed")

    def __enter__(self) -> MooncakeFeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
