"""put_with_retry: waits while the shared store is full, refuses what never fits."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from specforge_lightning.data.stores.base import FeatureStoreError
from specforge_lightning.data.stores.local import LocalFeatureStore
from specforge_lightning.data.stores.spec import put_with_retry


def test_put_with_retry_waits_for_space_and_refuses_what_never_fits():
    store = LocalFeatureStore(max_resident_bytes=100)
    store.put({"x": torch.zeros(20)}, "a")  # 80 bytes
    threading.Timer(0.1, store.abort, args=("a",)).start()
    t0 = time.monotonic()
    put_with_retry(store, {"x": torch.zeros(10)}, "b", retry_s=5)
    assert time.monotonic() - t0 >= 0.09
    with pytest.raises(FeatureStoreError, match="can never fit"):
        put_with_retry(store, {"x": torch.zeros(30)}, "c")


def test_mooncake_without_a_master_fails_within_the_connect_timeout_naming_the_address():
    import socket

    from specforge_lightning.data.stores.mooncake_io import MooncakeConnectError
    from specforge_lightning.data.stores.spec import StoreSpec, build_store
    from specforge_lightning.errors import UserError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = StoreSpec(kind="mooncake", master_address=f"127.0.0.1:{port}", metadata_server=f"http://127.0.0.1:{port}/metadata")
    assert spec.connect_timeout_s == 10.0
    t0 = time.monotonic()
    with pytest.raises(MooncakeConnectError) as err:
        build_store(spec, consume_once=False)
    assert time.monotonic() - t0 < 15
    assert str(err.value).startswith(f"no Mooncake master at 127.0.0.1:{port} (metadata http://127.0.0.1:{port}/metadata")
    assert isinstance(err.value, UserError) and isinstance(err.value, FeatureStoreError)


def test_store_config_errors_are_user_errors_naming_the_field():
    from specforge_lightning.data.stores.spec import StoreConfigError, StoreSpec, build_store

    with pytest.raises(StoreConfigError, match="store.root"):
        build_store(StoreSpec(kind="shared_dir"), consume_once=False)
    with pytest.raises(ValueError, match="unknown store kind"):
        build_store(StoreSpec(kind="nfs"), consume_once=False)
