"""SharedDirFeatureStore: one safetensors file per sample in a folder shared by processes."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from specforge_lightning.contracts import SampleRef
from specforge_lightning.data.stores.base import FeatureStoreError
from specforge_lightning.data.stores.shared_dir import SharedDirFeatureStore
from tests.data.stores.threaded import produce_while_consuming


def _tensors(length: int = 4, fill: float = 1.0) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(length), "hidden_state": torch.full((length, 3), fill, dtype=torch.bfloat16)}


def _files(store: SharedDirFeatureStore) -> list[str]:
    return sorted(p.name for p in store.samples_dir.iterdir())


def test_put_get_release_consume_once(tmp_path):
    store = SharedDirFeatureStore(tmp_path)
    ref = store.put(_tensors(5, 2.0), "run:1", strategy="eagle3", provenance={"t": 1})
    assert ref.generation == 1 and ref.num_tokens == 5
    assert ref.store_uri == f"dir://{tmp_path.resolve()}/samples/run%3A1.g1.safetensors"
    assert _files(store) == ["run%3A1.g1.safetensors"]  # no temp files left behind
    assert SampleRef.from_json(ref.to_json()) == ref

    got, lease = store.get(ref)
    assert got["hidden_state"].dtype == torch.bfloat16
    assert torch.equal(got["hidden_state"], torch.full((5, 3), 2.0, dtype=torch.bfloat16))
    store.release(lease)
    assert _files(store) == []
    assert torch.equal(got["input_ids"], torch.arange(5))  # the tensors outlive the deleted file
    with pytest.raises(FeatureStoreError, match="missing"):
        store.get(ref)
    h = store.health()
    assert h["resident_samples"] == 0 and h["freed"] == 1 and h["gets"] == 1


def test_retained_store_keeps_files(tmp_path):
    store = SharedDirFeatureStore(tmp_path, consume_once=False)
    ref = store.put(_tensors(), "s")
    for _ in range(2):
        _, lease = store.get(ref)
        store.release(lease)
    assert store.health()["resident_samples"] == 1


def test_generation_is_shared_and_stale_refs_refused(tmp_path):
    producer = SharedDirFeatureStore(tmp_path)
    other = SharedDirFeatureStore(tmp_path)  # a second process on the same folder
    first = producer.put(_tensors(fill=1.0), "s")
    second = other.put(_tensors(fill=2.0), "s")
    assert second.generation == first.generation + 1
    assert _files(producer) == ["s.g2.safetensors"]  # the re-put superseded the older file
    with pytest.raises(FeatureStoreError, match="stale ref.*generation 1.*latest generation 2"):
        producer.get(first)
    got, lease = producer.get(second)
    assert got["hidden_state"][0, 0] == 2.0
    producer.release(lease)
    # the counter survives consumption, so the old ref can never be matched again
    third = producer.put(_tensors(fill=3.0), "s")
    assert third.generation == 3
    with pytest.raises(FeatureStoreError, match="stale"):
        other.get(first)


@pytest.mark.multiprocess
def test_generation_counter_across_processes(tmp_path):
    code = textwrap.dedent(
        f"""
        import torch
        from specforge_lightning.data.stores.shared_dir import SharedDirFeatureStore
        store = SharedDirFeatureStore({str(tmp_path)!r}, token="k")
        print(store.put({{"x": torch.ones(2)}}, "s").to_json())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    ref = SampleRef.from_json(out.stdout.strip().splitlines()[-1])
    assert ref.generation == 1
    store = SharedDirFeatureStore(tmp_path, token="k")
    got, _ = store.get(ref)
    assert torch.equal(got["x"], torch.ones(2))
    assert store.put({"x": torch.zeros(2)}, "s").generation == 2


def test_token_digest_checked_and_secret_not_stored(tmp_path):
    writer = SharedDirFeatureStore(tmp_path, token="s3cret-token")
    ref = writer.put(_tensors(), "s")
    assert b"s3cret-token" not in (tmp_path / "samples" / "s.g1.safetensors").read_bytes()
    with pytest.raises(FeatureStoreError, match="token mismatch"):
        SharedDirFeatureStore(tmp_path, token="wrong").get(ref)
    with pytest.raises(FeatureStoreError, match="has none"):
        SharedDirFeatureStore(tmp_path).get(ref)
    unsigned = SharedDirFeatureStore(tmp_path).put(_tensors(), "u")
    with pytest.raises(FeatureStoreError, match="token mismatch"):
        writer.get(unsigned)
    got, _ = SharedDirFeatureStore(tmp_path, token="s3cret-token").get(ref)
    assert got["input_ids"].numel() == 4


def test_cap_on_resident_bytes(tmp_path):
    store = SharedDirFeatureStore(tmp_path, max_resident_bytes=600)
    a = store.put(_tensors(), "a")  # ~56 tensor bytes plus a header
    size = store.health()["resident_bytes"]
    assert 0 < size < 600
    while store.health()["resident_bytes"] + 56 <= 600:
        store.put(_tensors(), f"fill{store.health()['resident_samples']}")
    over = r"\(56 bytes\) would exceed max_resident_bytes=600 \(\d+ bytes resident"
    with pytest.raises(FeatureStoreError, match=over):
        store.put(_tensors(), "over")
    store.put(_tensors(), "a")  # a re-put replaces its own file, it is not counted twice
    _, lease = store.get(store.put(_tensors(), "a"))
    store.release(lease)
    store.put(_tensors(), "now-fits")
    assert "now-fits.g1.safetensors" in _files(store) and a.generation == 1


def test_abort_deletes_all_generations(tmp_path):
    store = SharedDirFeatureStore(tmp_path)
    store.put(_tensors(), "s")
    store.put(_tensors(), "s")
    store.put(_tensors(), "keep")
    store.abort("s")
    assert _files(store) == ["keep.g1.safetensors"]
    assert store.health()["aborted"] == 1


def test_missing_key_and_truncated_file_name_the_file(tmp_path):
    store = SharedDirFeatureStore(tmp_path, consume_once=False)
    ref = store.put(_tensors(), "s")
    path = tmp_path.resolve() / "samples" / "s.g1.safetensors"
    wrong = SampleRef(ref.sample_id, ref.store_uri, {"logits": "logits"}, generation=ref.generation)
    with pytest.raises(FeatureStoreError, match=re.escape(str(path)) + ".*'logits'"):
        store.get(wrong)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FeatureStoreError, match=re.escape(str(path)) + ".*truncated"):
        store.get(ref)


def test_ref_must_match_store_layout(tmp_path):
    store = SharedDirFeatureStore(tmp_path)
    ref = store.put(_tensors(), "s")
    forged = SampleRef("s", "dir:///etc/passwd", dict(ref.feature_keys), generation=1)
    with pytest.raises(FeatureStoreError, match="points at /etc/passwd"):
        store.get(forged)
    with pytest.raises(FeatureStoreError, match="cannot read"):
        store.get(SampleRef("s", "mem://s", dict(ref.feature_keys), generation=1))


def test_odd_sample_ids_are_safe_file_names(tmp_path):
    store = SharedDirFeatureStore(tmp_path, consume_once=False)
    for sid in ["../escape", ".hidden", "a/b", "a.g1"]:
        ref = store.put(_tensors(), sid)
        assert store.get(ref)[0]["input_ids"].numel() == 4
    assert all("/" not in name and not name.startswith(".") for name in _files(store))
    assert store.health()["resident_samples"] == 4
    assert not (tmp_path.parent / "escape.g1.safetensors").exists()


def test_concurrent_producer_and_consumer_threads(tmp_path):
    store = SharedDirFeatureStore(tmp_path)
    n = 40
    values = produce_while_consuming(store, n, length=2)
    assert values == [float(i) for i in range(n)]
    assert store.health()["resident_samples"] == 0
