"""One producer thread putting while the test thread gets: the concurrency check every store shares."""

from __future__ import annotations

import threading

import torch

from specforge_lightning.contracts import SampleRef
from specforge_lightning.data.stores.base import FeatureStore


def produce_while_consuming(store: FeatureStore, n: int, length: int) -> list[float]:
    """Put ``n`` samples ``s{i}`` (``x`` = ``length`` copies of ``i``) from a thread; get and release each in order.

    Returns the first value of every sample read, so a caller asserts the order and the values.
    """
    refs: list[SampleRef] = []
    ready = threading.Condition()

    def produce():
        for i in range(n):
            ref = store.put({"x": torch.full((length,), float(i))}, f"s{i}")
            with ready:
                refs.append(ref)
                ready.notify()

    thread = threading.Thread(target=produce)
    thread.start()
    seen = []
    for i in range(n):
        with ready:
            ready.wait_for(lambda: len(refs) > i, timeout=10)
            ref = refs[i]
        got, lease = store.get(ref)
        seen.append(float(got["x"][0]))
        store.release(lease)
    thread.join()
    return seen
