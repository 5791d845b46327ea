"""MooncakeFeatureStore against a real mooncake_master on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from specforge_lightning.contracts import FeatureSpec, SampleRef
from specforge_lightning.data.stores.base import FeatureStoreError
from specforge_lightning.data.stores.mooncake import MooncakeFeatureStore
from specforge_lightning.data.stores.mooncake_io import tensor_bytes, tensor_from_bytes

pytestmark = pytest.mark.mooncake
REPO = Path(__file__).resolve().parents[3]


def make_store(master, **kw) -> MooncakeFeatureStore:
    opts = dict(prefix=f"t{uuid.uuid4().hex[:8]}", segment_bytes=32 << 20, local_buffer_bytes=16 << 20)
    opts["staging_bytes"] = 1 << 20
    opts.update(kw)
    return MooncakeFeatureStore(master.master_address, master.metadata_server, **opts)


@pytest.fixture(scope="module")
def store(mooncake_master):
    """Shared by the tests of this module (closing a client costs ~2 s); each test uses its own sample ids."""
    s = make_store(mooncake_master)
    yield s
    s.close()


@pytest.fixture(scope="module")
def peer(store, mooncake_master):
    """A second client on the same prefix that lends no memory, like a pure producer or another trainer."""
    p = make_store(mooncake_master, prefix=store.prefix, segment_bytes=0)
    yield p
    p.close()


def sample(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 7, 24, generator=g).to(torch.bfloat16),
        "target": torch.randn(1, 7, 16, generator=g),
        "input_ids": torch.randint(0, 1000, (1, 7), generator=g),
        "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 0, 1]], dtype=torch.bool),
        "transposed": torch.randn(5, 3, generator=g).t(),  # not contiguous
    }


def exists(store: MooncakeFeatureStore, ref: SampleRef) -> list[int]:
    return list(store.client.batch_is_exist(list(ref.feature_keys.values())))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_raw_bytes_helpers_round_trip_bf16():
    t = torch.randn(3, 4).to(torch.bfloat16)
    raw = tensor_bytes(t)
    assert raw.dtype == torch.uint8 and raw.numel() == 24
    back = tensor_from_bytes(bytes(raw.numpy()), FeatureSpec("x", (3, 4), "bfloat16"))
    assert torch.equal(back, t)


def test_put_get_round_trip_keeps_dtype_shape_and_bytes(store):
    tensors = sample()
    ref = store.put(tensors, "s-1", strategy="eagle3", provenance={"target": "tiny"})
    assert ref.store_uri == "mooncake://s-1" and ref.generation == 0 and ref.num_tokens == 7
    assert ref.feature_keys["hidden_states"] == f"{store.prefix}/s-1/g0/hidden_states"
    assert ref.spec("hidden_states").dtype == "bfloat16" and ref.spec("target").dtype == "float32"
    assert SampleRef.from_json(ref.to_json()) == ref  # metadata only, survives the wire
    got, lease = store.get(SampleRef.from_json(ref.to_json()))
    assert_same(got, tensors)
    assert lease.sample_id == "s-1" and lease.generation == 0
    store.release(lease)


def test_consume_once_release_frees_objects(store, peer):
    ref = store.put(sample(), "s-2")
    assert exists(store, ref) == [1] * len(ref.feature_keys)
    _, lease = store.get(ref)
    store.release(lease)
    assert exists(store, ref) == [0] * len(ref.feature_keys)
    store.release(lease)  # a second release is a no-op
    with pytest.raises(FeatureStoreError, match="already released"):
        store.get(ref)
    assert store.health()["open_leases"] == 0
    with pytest.raises(FeatureStoreError, match="missing"):  # another client sees the objects gone
        peer.get(ref)


def test_retained_store_keeps_objects_until_abort(mooncake_master):
    s = make_store(mooncake_master, consume_once=False)
    try:
        ref = s.put(sample(1), "s-3")
        for _ in range(2):  # re-iterable: release does not free
            got, lease = s.get(ref)
            s.release(lease)
        assert_same(got, sample(1))
        s.abort("s-3")
        assert exists(s, ref) == [0] * len(ref.feature_keys)
        with pytest.raises(FeatureStoreError):
            s.get(ref)
    finally:
        s.close()


def test_abort_from_another_client_removes_every_generation(store, peer):
    ref = store.put(sample(), "s-4")
    peer.abort("s-4")  # knows no keys of s-4: removes by pattern
    assert exists(store, ref) == [0] * len(ref.feature_keys)


def test_stale_generation_and_missing_object_raise_clearly(store):
    old = store.put(sample(1), "s-5")
    new = store.put(sample(2), "s-5")
    assert (old.generation, new.generation) == (0, 1)
    assert exists(store, old) == [0] * len(old.feature_keys)  # the re-put freed g0
    with pytest.raises(FeatureStoreError, match="stale"):
        store.get(old)
    got, lease = store.get(new)
    assert_same(got, sample(2))
    store.release(lease)
    spec = FeatureSpec("x", (2,), "float32")
    ghost = SampleRef("nope", "mooncake://nope", {"x": f"{store.prefix}/nope/g0/x"}, (spec,))
    with pytest.raises(FeatureStoreError, match="nope.*missing"):
        store.get(ghost)
    with pytest.raises(FeatureStoreError, match="not a mooncake"):
        store.get(SampleRef("a", "mem://a", {}))


class FailingClient:
    """Delegates to the real client but refuses (rc -200) to write keys ending in '/zz_fail'."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def batch_put_from(self, keys, ptrs, sizes, cfg):
        ok = [i for i, k in enumerate(keys) if not k.endswith("/zz_fail")]
        codes = self.real.batch_put_from([keys[i] for i in ok], [ptrs[i] for i in ok], [sizes[i] for i in ok], cfg)
        out = [-200] * len(keys)
        for i, rc in zip(ok, codes):
            out[i] = rc
        return out


def test_put_is_all_or_nothing(store):
    tensors = {"a": torch.ones(10), "b": torch.zeros(4, dtype=torch.int64), "zz_fail": torch.ones(3)}
    real = store.client
    store._client = FailingClient(real)
    try:
        with pytest.raises(FeatureStoreError, match="zz_fail.*no space"):
            store.put(tensors, "s-6")
    finally:
        store._client = real
    keys = [store.key("s-6", 0, name) for name in tensors]
    assert list(real.batch_is_exist(keys)) == [0, 0, 0]
    assert "s-6" not in store._live
    ref = store.put({"a": torch.ones(10)}, "s-6")  # the id is usable afterwards
    assert ref.generation == 0


def test_tensors_larger_than_staging_use_bytes_path(mooncake_master):
    for staging in (4096, 0):  # too small for one tensor / no staging at all
        s = make_store(mooncake_master, staging_bytes=staging)
        try:
            assert s.zero_copy == (staging > 0)
            tensors = {"big": torch.randn(64, 256), "small": torch.arange(10), "empty": torch.empty(0, 4)}
            tensors.update({f"c{i}": torch.randn(500) for i in range(3)})  # 2 KB each: two per staging run
            ref = s.put(tensors, "s-7")
            got, lease = s.get(ref)
            assert_same(got, tensors)
            s.release(lease)
            assert exists(s, ref) == [0] * len(tensors)
        finally:
            s.close()


def test_same_prefix_collision_is_refused(store, peer):
    store.put(sample(), "s-8")
    with pytest.raises(FeatureStoreError, match="already exist"):
        peer.put(sample(), "s-8")


def test_health_and_close(mooncake_master):
    s = make_store(mooncake_master)
    h = s.health()
    assert h["ok"] and h["backend"] == "mooncake" and h["zero_copy"]
    s.close()
    s.close()  # idempotent
    assert s.health() == {**h, "ok": False, "status": "closed", "zero_copy": False}
    with pytest.raises(FeatureStoreError, match="closed"):
        s.put(sample(), "s-9")


PRODUCER = textwrap.dedent(
    """
    import json, sys, torch
    from specforge_lightning.data.stores.mooncake import MooncakeFeatureStore
    master, metadata, prefix = sys.argv[1:4]
    store = MooncakeFeatureStore(master, metadata, prefix=prefix, segment_bytes=0, staging_bytes=1 << 20)
    for i in range(3):
        t = {"h": (torch.arange(96, dtype=torch.float32) + i).reshape(1, 4, 24).to(torch.bfloat16),
             "ids": torch.arange(4).reshape(1, 4) + i}
        print(store.put(t, f"p{i}").to_json(), flush=True)
    store.close()
    """
)


def test_two_processes_producer_puts_this_process_gets(store, mooncake_master):
    env = {**os.environ, "MC_TCP_BIND_ADDRESS": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", PRODUCER, mooncake_master.master_address, mooncake_master.metadata_server, store.prefix],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    refs = [SampleRef.from_json(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r.sample_id for r in refs] == ["p0", "p1", "p2"]
    for i, ref in enumerate(refs):  # the producer has exited; its objects live in our segment
        got, lease = store.get(ref)
        expected = (torch.arange(96, dtype=torch.float32) + i).reshape(1, 4, 24).to(torch.bfloat16)
        assert torch.equal(got["h"], expected) and torch.equal(got["ids"], torch.arange(4).reshape(1, 4) + i)
        store.release(lease)
        assert exists(store, ref) == [0, 0]
    assert json.loads(refs[0].to_json())["feature_specs"][0]["dtype"] == "bfloat16"
