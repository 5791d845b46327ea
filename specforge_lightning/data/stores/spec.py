"""The store a producer and its trainers share: its description, how to open it, and a put that waits for room.

A producer (``target/producer.py``) and the trainers of a disaggregated run read the
same ``store`` section of the YAML into a :class:`StoreSpec`; :func:`build_store`
opens the shared directory or Mooncake store it names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from specforge_lightning.contracts import SampleRef
from specforge_lightning.data.stores.base import FeatureStore, FeatureStoreError
from specforge_lightning.data.stores.local import nbytes_of
from specforge_lightning.data.stores.mooncake import MooncakeFeatureStore
from specforge_lightning.data.stores.shared_dir import SharedDirFeatureStore
from specforge_lightning.errors import UserError


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
    # How long a Mooncake client waits for its master to answer before it names the address and stops.
    connect_timeout_s: float = 10.0


class StoreConfigError(UserError, ValueError):
    """The ``store`` section cannot open a store (missing root or addresses, unknown kind); it names the field."""


def build_store(spec: StoreSpec, *, consume_once: bool, producer: bool = False) -> FeatureStore:
    """Open the store ``spec`` names. Trainers use ``consume_once=False`` and free after the durable ack."""
    if spec.kind == "shared_dir":
        if not spec.root:
            raise StoreConfigError("store.kind=shared_dir needs store.root (a folder the producer and trainers share)")
        token = spec.token or os.environ.get(spec.token_env) or None
        return SharedDirFeatureStore(
            spec.root, consume_once=consume_once, max_resident_bytes=spec.max_resident_bytes, token=token
        )
    if spec.kind == "mooncake":
        master = spec.master_address or os.environ.get("MOONCAKE_MASTER_SERVER_ADDR", "")
        metadata = spec.metadata_server or os.environ.get("MOONCAKE_METADATA_SERVER", "")
        if not master or not metadata:
            raise StoreConfigError(
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
            connect_timeout_s=spec.connect_timeout_s,
        )
    raise StoreConfigError(f"unknown store kind {spec.kind!r}; use 'shared_dir' or 'mooncake'")


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

