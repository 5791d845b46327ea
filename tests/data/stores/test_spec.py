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
