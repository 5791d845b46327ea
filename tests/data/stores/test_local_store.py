"""LocalFeatureStore (memory) and PreparedShardStore (read-only shards)."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from specforge_lightning.contracts import SampleRef
from specforge_lightning.data.stores.shards import write_shard
from specforge_lightning.data.stores.base import FeatureStoreError
from specforge_lightning.data.stores.local import LocalFeatureStore, PreparedShardStore
from tests.data.stores.threaded import produce_while_consuming


def _tensors(length: int = 4, fill: float = 1.0) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(length), "hidden_state": torch.full((length, 3), fill)}


def test_put_get_round_trip_and_ref():
    store = LocalFeatureStore()
    src = _tensors(5, 2.0)
    ref = store.put(src, "s1", strategy="eagle3", provenance={"target": "tiny"})
    assert ref.store_uri == "mem://s1"
    assert ref.generation == 1 and ref.num_tokens == 5 and ref.strategy == "eagle3"
    assert ref.spec("hidden_state").shape == (5, 3)
    assert SampleRef.from_json(ref.to_json()) == ref  # metadata only, serialisable

    src["hidden_state"].fill_(9.0)  # the producer reusing its buffer must not change the stored sample
    got, lease = store.get(ref)
    assert torch.equal(got["hidden_state"], torch.full((5, 3), 2.0))
    store.release(lease)
    again, _ = store.get(ref)  # retained by default: epochs can repeat
    assert torch.equal(again["input_ids"], torch.arange(5))


def test_stale_generation_is_rejected():
    store = LocalFeatureStore()
    old = store.put(_tensors(fill=1.0), "s")
    new = store.put(_tensors(fill=2.0), "s")
    assert new.generation == old.generation + 1
    with pytest.raises(FeatureStoreError, match="stale ref.*generation 1.*generation 2"):
        store.get(old)
    got, _ = store.get(new)
    assert got["hidden_state"][0, 0] == 2.0


def test_consume_once_frees_on_last_release():
    store = LocalFeatureStore(consume_once=True)
    ref = store.put(_tensors(), "s")
    _, lease_a = store.get(ref)
    _, lease_b = store.get(ref)
    store.release(lease_a)
    store.release(lease_a)  # a repeated release is a no-op, it must not drop b's lease
    assert store.health()["resident_samples"] == 1
    store.release(lease_b)
    assert store.health()["resident_samples"] == 0
    with pytest.raises(FeatureStoreError, match="not resident"):
        store.get(ref)
    # the generation survives the free: a re-put is a new generation, the old ref stays stale
    newer = store.put(_tensors(), "s")
    assert newer.generation == 2
    with pytest.raises(FeatureStoreError, match="stale"):
        store.get(ref)


def test_abort_and_health_counts():
    store = LocalFeatureStore()
    a = store.put(_tensors(4), "a")
    store.put(_tensors(2), "b")
    h = store.health()
    assert h["resident_samples"] == 2
    assert h["resident_bytes"] == (4 * 8 + 12 * 4) + (2 * 8 + 6 * 4)
    _, lease = store.get(a)
    assert store.health()["leased_samples"] == 1
    store.abort("a")
    store.release(lease)  # release after abort is harmless
    h = store.health()
    assert h["resident_samples"] == 1 and h["aborted"] == 1 and h["puts"] == 2
    with pytest.raises(FeatureStoreError, match="not resident"):
        store.get(a)


def test_resident_cap_names_the_sizes():
    one = 4 * 8 + 12 * 4  # bytes of _tensors(4)
    store = LocalFeatureStore(max_resident_bytes=2 * one)
    store.put(_tensors(), "a")
    store.put(_tensors(), "b")
    with pytest.raises(FeatureStoreError, match=f"{one} bytes.*max_resident_bytes={2 * one}.*{2 * one} bytes resident"):
        store.put(_tensors(), "c")
    store.put(_tensors(), "b")  # replacing a sample does not count it twice
    store.abort("a")
    store.put(_tensors(), "c")
    assert store.health()["resident_bytes"] == 2 * one


def test_bad_refs_and_inputs():
    store = LocalFeatureStore()
    ref = store.put(_tensors(), "s")
    with pytest.raises(FeatureStoreError, match="cannot read"):
        store.get(SampleRef("s", "dir:///x", {"input_ids": "input_ids"}, generation=1))
    bad_key = SampleRef("s", "mem://s", {"logits": "logits"}, generation=ref.generation)
    with pytest.raises(FeatureStoreError, match="no features"):
        store.get(bad_key)
    with pytest.raises(FeatureStoreError, match="not tensors"):
        store.put({"x": [1, 2]}, "t")
    with pytest.raises(FeatureStoreError, match="without tensors"):
        store.put({}, "t")


def test_producer_thread_puts_while_consumer_gets():
    store = LocalFeatureStore(consume_once=True)
    n = 200
    seen = produce_while_consuming(store, n, length=3)
    assert seen == [float(i) for i in range(n)]
    assert store.health()["resident_samples"] == 0 and store.health()["freed"] == n


# -- PreparedShardStore ----------------------------------------------------------------------


def _prepared(tmp_path):
    (tmp_path / "train").mkdir()
    write_shard(tmp_path / "train" / "shard-00000.safetensors", [("a", _tensors(3, 1.0)), ("b", _tensors(2, 2.0))])
    write_shard(tmp_path / "train" / "shard-00001.safetensors", [("c", _tensors(4, 3.0))])
    return PreparedShardStore(tmp_path)


def test_prepared_store_reads_shards(tmp_path):
    store = _prepared(tmp_path)
    refs = store.refs()
    assert [r.sample_id for r in refs] == ["a", "b", "c"]
    for ref, fill in zip(refs, [1.0, 2.0, 3.0]):
        got, lease = store.get(ref)
        assert got["hidden_state"].shape == (ref.num_tokens, 3)
        assert torch.all(got["hidden_state"] == fill)
        store.release(lease)
    # re-readable: release never frees prepared data
    assert store.get(refs[0])[0]["input_ids"].tolist() == [0, 1, 2]
    assert store.health()["open_files"] == 2
    assert [r.sample_id for r in store.refs(["train/shard-00001.safetensors"])] == ["c"]


def test_prepared_store_is_read_only_and_checks_refs(tmp_path):
    store = _prepared(tmp_path)
    ref = store.refs()[0]
    with pytest.raises(FeatureStoreError, match="read-only"):
        store.put(_tensors(), "z")
    store.abort(ref.sample_id)  # never deletes prepared files
    assert store.get(ref)[0]["input_ids"].numel() == 3
    missing = SampleRef(ref.sample_id, ref.store_uri, {"logits": "a/logits"})
    with pytest.raises(FeatureStoreError, match=re.escape("no tensor 'a/logits'")):
        store.get(missing)
    outside = tmp_path.parent / "elsewhere.safetensors"
    with pytest.raises(FeatureStoreError, match="outside the store root"):
        store.get(SampleRef("a", f"shard://{outside}#a", dict(ref.feature_keys)))
    with pytest.raises(FeatureStoreError, match="does not exist"):
        PreparedShardStore(tmp_path / "nope")


def test_prepared_store_threads_share_handles(tmp_path):
    store = _prepared(tmp_path)
    refs = store.refs()
    errors: list[BaseException] = []

    def read():
        try:
            for _ in range(50):
                for ref in refs:
                    got, lease = store.get(ref)
                    assert got["input_ids"].numel() == ref.num_tokens
                    store.release(lease)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.health()["gets"] == 3 * 50 * 3
