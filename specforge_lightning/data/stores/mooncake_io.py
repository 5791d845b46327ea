"""Mooncake's client side: connecting, the registered zero-copy staging buffer, and raw tensor bytes.

The FeatureStore (``mooncake.py``) decides keys, generations and lifetimes; this
module only moves bytes. A sample's tensors are packed into the staging buffer and
written with one ``batch_put_from`` (read back with one ``batch_get_into``); a
tensor larger than the buffer goes through the bytes API (``put``/``get``), which is
bounded by ``local_buffer_bytes``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from specforge_lightning.contracts import FeatureSpec
from specforge_lightning.data.stores.base import FeatureStoreError
from specforge_lightning.errors import UserError

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


class MooncakeConnectError(UserError, FeatureStoreError):
    """No Mooncake master (or metadata server) answers at the configured address."""


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``http://host:port/...``; None when it names no TCP port."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.split("/", 1)[0].rpartition(":")
    return (host.strip("[]"), int(port)) if sep and port.isdigit() else None


def wait_reachable(master_address: str, metadata_server: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when nothing listens at the master (or an HTTP metadata server).

    Mooncake's own setup retries for ~100 s and ends in ``rc=-1 (mooncake error)``; a plain
    TCP connect, retried until the deadline (a master may be starting), says what is missing.
    """
    deadline = time.monotonic() + timeout_s
    targets = [("master", master_address, f"metadata {metadata_server}")]
    if metadata_server.startswith("http"):
        targets.append(("metadata server", metadata_server, f"master {master_address}"))
    for what, address, other in targets:
        hp = _host_port(address)
        if hp is None:
            continue
        while True:
            try:
                with socket.create_connection(hp, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                    break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise MooncakeConnectError(
                        f"no Mooncake {what} at {address} ({other}; {e.strerror or e} for {timeout_s:g} s): "
                        "start mooncake_master"
                        f"{' with --enable_http_metadata_server' if what != 'master' else ''} there, or fix "
                        "store.master_address / store.metadata_server (store.connect_timeout_s bounds this wait)"
                    ) from None
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


@dataclass
class Connection:
    """A set-up Mooncake client, its hard-pinned replicate config and its staging buffer (None: bytes API only)."""

    client: Any
    config: Any
    staging: torch.Tensor | None


def connect(
    master_address: str,
    metadata_server: str,
    *,
    segment_bytes: int,
    local_buffer_bytes: int,
    staging_bytes: int,
    protocol: str,
    rdma_devices: str,
    local_hostname: str,
    connect_timeout_s: float = 10.0,
) -> Connection:
    """Set up a ``MooncakeDistributedStore`` client and register a staging buffer of ``staging_bytes``.

    The master must answer within ``connect_timeout_s`` (see :func:`wait_reachable`).
    """
    wait_reachable(master_address, metadata_server, connect_timeout_s)
    # Without this the transfer engine advertises the machine's external address.
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", local_hostname)
    try:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise FeatureStoreError(
            "Mooncake is not importable; install mooncake-transfer-engine-non-cuda==0.3.13.post1 "
            f"and Debian's libibverbs1 ({e})"
        ) from e
    client = MooncakeDistributedStore()
    rc = client.setup(
        local_hostname, metadata_server, segment_bytes, local_buffer_bytes, protocol, rdma_devices, master_address
    )
    if rc != 0:
        raise MooncakeConnectError(
            f"Mooncake setup failed ({explain(rc)}): master {master_address}, metadata {metadata_server}"
        )
    config = ReplicateConfig()
    config.replica_num = 1
    config.with_hard_pin = True  # never evicted: we free explicitly
    staging: torch.Tensor | None = None
    if staging_bytes > 0:
        buf = torch.empty(staging_bytes, dtype=torch.uint8)
        if client.register_buffer(buf.data_ptr(), buf.numel()) == 0:
            staging = buf
    return Connection(client, config, staging)


def fits(staging: torch.Tensor | None, sizes: Iterable[int]) -> bool:
    """Whether tensors of these byte sizes fit the staging buffer together."""
    return staging is not None and sum(_align(n) for n in sizes) <= staging.numel()


def groups(staging: torch.Tensor | None, sizes: list[int]) -> list[list[int]]:
    """Split tensors (by index) into runs that fit the staging buffer; oversized ones go alone."""
    cap = staging.numel() if staging is not None else 0
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(sizes):
        if _align(n) > cap:
            out.append([i])
            continue
        if used + _align(n) > cap:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += _align(n)
    if current:
        out.append(current)
    return out


def write_objects(
    client: Any, config: Any, staging: torch.Tensor | None, items: list[tuple[str, torch.Tensor]], written: list[str]
) -> None:
    """Put ``(key, uint8 bytes)`` items; ``written`` collects the keys that landed (for a rollback on failure)."""
    for group in groups(staging, [data.numel() for _, data in items]):
        chunk = [items[i] for i in group if items[i][1].numel()]  # empty tensors are not stored
        if not chunk:
            continue
        staged = fits(staging, (d.numel() for _, d in chunk))
        if staged:
            ptrs, sizes, off = [], [], 0
            for _, data in chunk:
                staging[off : off + data.numel()].copy_(data)
                ptrs.append(staging.data_ptr() + off)
                sizes.append(data.numel())
                off += _align(data.numel())
            codes = client.batch_put_from([k for k, _ in chunk], ptrs, sizes, config)
        else:  # larger than the staging buffer: the bytes API
            codes = [client.put(k, d.numpy(), config) for k, d in chunk]
        written.extend(k for (k, _), rc in zip(chunk, codes) if rc == 0)
        bad = [(k, rc) for (k, _), rc in zip(chunk, codes) if rc != 0]
        if bad:
            hint = "" if staged else " (bytes API: bounded by local_buffer_bytes; a larger staging_bytes avoids it)"
            raise FeatureStoreError(f"put of {bad[0][0]} failed: {explain(bad[0][1])}{hint}")


def read_objects(
    client: Any, staging: torch.Tensor | None, sid: str, gen: int, items: list[tuple[str, FeatureSpec, int]]
) -> dict[str, torch.Tensor]:
    """Fresh tensors for ``(key, spec, nbytes)`` items of sample ``sid`` generation ``gen``."""
    out: dict[str, torch.Tensor] = {}
    for group in groups(staging, [n for _, _, n in items]):
        chunk = [items[i] for i in group]
        for key, spec, n in chunk:
            if n == 0:
                out[spec.name] = tensor_from_bytes(b"", spec)
        chunk = [c for c in chunk if c[2] > 0]
        if not chunk:
            continue
        if fits(staging, (n for _, _, n in chunk)):
            offs, off = [], 0
            for _, _, n in chunk:
                offs.append(off)
                off += _align(n)
            codes = client.batch_get_into(
                [k for k, _, _ in chunk], [staging.data_ptr() + o for o in offs], [n for _, _, n in chunk]
            )
            for (key, spec, n), o, rc in zip(chunk, offs, codes):
                _check_read(sid, gen, key, rc, n)
                out[spec.name] = tensor_from_bytes(staging[o : o + n], spec)
        else:
            for key, spec, n in chunk:
                data = client.get(key)
                _check_read(sid, gen, key, len(data) if data else -704, n)
                out[spec.name] = tensor_from_bytes(data, spec)
    return out


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
