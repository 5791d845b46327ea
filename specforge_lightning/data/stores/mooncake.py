"""FeatureStore over Mooncake's distributed KV store: features cross machines without files.

Layout: one Mooncake object per tensor, key ``{prefix}/{sample_id}/g{generation}/{feature}``,
value = the tensor's raw contiguous bytes, no header. Shape and dtype travel in the
SampleRef's FeatureSpecs, so any process can rebuild the tensor (bf16 included: bytes
move through a ``uint8`` view, never through numpy dtypes).

Objects are hard-pinned (never evicted): this store is the only lifetime authority.
They are freed by ``release`` (consume-once) or ``abort``, with ``force=True``,
because Mooncake grants a reader a short lease on every lookup and an ordinary
remove fails (-706) while it lasts.

Data path: a staging buffer registered once with the transfer engine; a sample
is packed into it and written with one ``batch_put_from`` (read back with one
``batch_get_into``). A tensor larger than the staging buffer falls back to the
bytes API (``put``/``get``), which is bounded by ``local_buffer_bytes``.
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

from specforge_lightning.contracts import FeatureSpec, SampleRef
from specforge_lightning.data.stores.base import FeatureStore, FeatureStoreError, Lease, specs_of

URI_SCHEME = "mooncake://"
ALIGN = 64  # byte alignment of tensors packed into the staging buffer
MIN_SEGMENT_BYTES = 16 << 20  # Mooncake refuses to mount a smaller segment
DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
# Mooncake error codes seen on the store API (negative return values).
ERRORS = {
    -200: "no space left in the mounted segments",
    -600: "invalid argument or buffer too small",
    -704: "object not found",
    -706: "object is leased by a reader",
}


def explain(rc: int) -> str:
    return f"rc={rc} ({ERRORS.get(rc, 'mooncake error')})"


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as a contiguous CPU ``uint8`` tensor (works for bf16, bool, ...)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def tensor_from_bytes(data: torch.Tensor | bytes | bytearray | memoryview, spec: FeatureSpec) -> torch.Tensor:
    """Rebuild a fresh tensor of ``spec``'s shape and dtype from raw bytes (the inverse of ``tensor_bytes``)."""
    dtype = dtype_of(spec.dtype)
    out = torch.empty(spec.shape, dtype=dtype)
    if out.numel() == 0:
        return out
    src = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dst = out.view(-1).view(torch.uint8)
    if src.numel() != dst.numel():
        raise FeatureStoreError(f"feature {spec.name}: got {src.numel()} bytes, spec {spec} needs {dst.numel()}")
    dst.copy_(src)
    return out


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise FeatureStoreError(f"dtype {name!r} is not supported by the Mooncake store (supported: {sorted(DTYPES)})")
    return DTYPES[name]


def nbytes_of(spec: FeatureSpec) -> int:
    n = 1
    for d in spec.shape:
        n *= d
    return n * torch.empty((), dtype=dtype_of(spec.dtype)).element_size()


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


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
    ) -> None:
        if 0 < segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be 0 or >= {MIN_SEGMENT_BYTES} (Mooncake's minimum): {segment_bytes}")
        if "/" in prefix or not prefix:
            raise ValueError(f"prefix must be a non-empty string without '/', got {prefix!r}")
        # Without this the transfer engine advertises the machine's external address.
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", local_hostname)
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise FeatureStoreError(
                "Mooncake is not importable; install mooncake-transfer-engine-non-cuda==0.3.13.post1 "
                f"and Debian's libibverbs1 ({e})"
            ) from e
        self.prefix = prefix
        self.master_address = master_address
        self.metadata_server = metadata_server
        self.consume_once = consume_once
        self._lock = threading.RLock()
        self._client = MooncakeDistributedStore()
        rc = self._client.setup(
            local_hostname, metadata_server, segment_bytes, local_buffer_bytes, protocol, rdma_devices, master_address
        )
        if rc != 0:
            raise FeatureStoreError(
                f"Mooncake setup failed ({explain(rc)}): master {master_address}, metadata {metadata_server}"
            )
        self._config = ReplicateConfig()
        self._config.replica_num = 1
        self._config.with_hard_pin = True  # never evicted: we free explicitly
        self._staging: torch.Tensor | None = None
        if staging_bytes > 0:
            buf = torch.empty(staging_bytes, dtype=torch.uint8)
            if self._client.register_buffer(buf.data_ptr(), buf.numel()) == 0:
                self._staging = buf
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
    def put(
        self,
        tensors: Mapping[str, torch.Tensor],
        sample_id: str,
        *,
        strategy: str = "",
        provenance: Mapping[str, Any] | None = None,
    ) -> SampleRef:
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
                self._write([(keys[s.name], raw[s.name]) for s in specs], written)
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

    def _write(self, items: list[tuple[str, torch.Tensor]], written: list[str]) -> None:
        for group in self._groups([data.numel() for _, data in items]):
            chunk = [items[i] for i in group if items[i][1].numel()]  # empty tensors are not stored
            if not chunk:
                continue
            staged = self._fits(d.numel() for _, d in chunk)
            if staged:
                ptrs, sizes, off = [], [], 0
                for _, data in chunk:
                    self._staging[off : off + data.numel()].copy_(data)
                    ptrs.append(self._staging.data_ptr() + off)
                    sizes.append(data.numel())
                    off += _align(data.numel())
                codes = self._client.batch_put_from([k for k, _ in chunk], ptrs, sizes, self._config)
            else:  # larger than the staging buffer: the bytes API
                codes = [self._client.put(k, d.numpy(), self._config) for k, d in chunk]
            written.extend(k for (k, _), rc in zip(chunk, codes) if rc == 0)
            bad = [(k, rc) for (k, _), rc in zip(chunk, codes) if rc != 0]
            if bad:
                hint = "" if staged else " (bytes API: bounded by local_buffer_bytes; a larger staging_bytes avoids it)"
                raise FeatureStoreError(f"put of {bad[0][0]} failed: {explain(bad[0][1])}{hint}")

    def _fits(self, sizes: Any) -> bool:
        return self._staging is not None and sum(_align(n) for n in sizes) <= self._staging.numel()

    def _groups(self, sizes: list[int]) -> list[list[int]]:
        """Split tensors (by index) into runs that fit the staging buffer; oversized ones go alone."""
        cap = self._staging.numel() if self._staging is not None else 0
        groups: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i, n in enumerate(sizes):
            if _align(n) > cap:
                groups.append([i])
                continue
            if used + _align(n) > cap:
                groups.append(current)
                current, used = [], 0
            current.append(i)
            used += _align(n)
        if current:
            groups.append(current)
        return groups

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
            out = self._read(sid, gen, items)
            keys = tuple(k for k, _, _ in items)
            if live is None or live.generation != gen:
                live = _Live(gen, keys)
            live.leases += 1
            self._track(sid, live)
        return out, Lease(sample_id=sid, generation=gen, handle=keys)

    def _read(self, sid: str, gen: int, items: list[tuple[str, FeatureSpec, int]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for group in self._groups([n for _, _, n in items]):
            chunk = [items[i] for i in group]
            for key, spec, n in chunk:
                if n == 0:
                    out[spec.name] = tensor_from_bytes(b"", spec)
            chunk = [c for c in chunk if c[2] > 0]
            if not chunk:
                continue
            if self._fits(n for _, _, n in chunk):
                offs, off = [], 0
                for _, _, n in chunk:
                    offs.append(off)
                    off += _align(n)
                codes = self._client.batch_get_into(
                    [k for k, _, _ in chunk], [self._staging.data_ptr() + o for o in offs], [n for _, _, n in chunk]
                )
                for (key, spec, n), o, rc in zip(chunk, offs, codes):
                    self._check_read(sid, gen, key, rc, n)
                    out[spec.name] = tensor_from_bytes(self._staging[o : o + n], spec)
            else:
                for key, spec, n in chunk:
                    data = self._client.get(key)
                    self._check_read(sid, gen, key, len(data) if data else -704, n)
                    out[spec.name] = tensor_from_bytes(data, spec)
        return out

    @staticmethod
    def _check_read(sid: str, gen: int, key: str, rc: int, expected: int) -> None:
        if rc == -704:
            raise FeatureStoreError(
                f"sample {sid} g{gen}: object {key} is missing (released, aborted, superseded by a newer "
                "generation, or its owner's segment went away)"
            )
        if rc < 0:
            raise FeatureStoreError(f"sample {sid} g{gen}: reading {key} failed: {explain(rc)}")
        if rc != expected:
            raise FeatureStoreError(f"sample {sid} g{gen}: {key} has {rc} bytes, its spec says {expected}")

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
