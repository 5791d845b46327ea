"""Prepared feature shards: round trip, header-only index, atomic writes, refusal of bad files."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from specforge_lightning.data.stores import shards
from specforge_lightning.data.stores.shards import ShardError, load_sample, read_shard_index, write_shard
from specforge_lightning.data.stores.base import FeatureStoreError


def _sample(length: int, hidden: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (length,), generator=g),
        "loss_mask": torch.ones(length, dtype=torch.int64),
        "hidden_state": torch.randn(length, 3 * hidden, generator=g).to(torch.bfloat16),
    }


def test_round_trip_and_index(tmp_path):
    path = tmp_path / "shard-0.safetensors"
    samples = [("run:00000001", _sample(5, seed=1)), ("a/b#c%41", _sample(3, seed=2))]
    write_shard(path, samples, metadata={"strategy": "eagle3", "target_id": "tiny"})

    refs = read_shard_index(path)
    assert [r.sample_id for r in refs] == ["run:00000001", "a/b#c%41"]
    assert [r.num_tokens for r in refs] == [5, 3]
    assert refs[0].store_uri == f"shard://{path.resolve()}#run:00000001"
    assert shards.parse_shard_uri(refs[1].store_uri) == (path.resolve(), "a/b#c%41")
    assert refs[0].strategy == "eagle3"
    assert refs[0].provenance == {"target_id": "tiny"}
    assert refs[1].feature_keys["hidden_state"] == "a/b#c%41/hidden_state"
    assert refs[0].spec("hidden_state").shape == (5, 12)
    assert refs[0].spec("hidden_state").dtype == "bfloat16"
    assert refs[0].spec("input_ids").dtype == "int64"

    for sid, original in samples:
        loaded = load_sample(path, sid)
        assert set(loaded) == set(original)
        for k in original:
            assert loaded[k].dtype == original[k].dtype
            assert torch.equal(loaded[k], original[k])


def test_index_reads_header_only(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    write_shard(path, [("x", _sample(4))])

    class NoTensorHandle:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "get_tensor":
                raise AssertionError("read_shard_index must not load tensors")
            return getattr(self._inner, name)

    real = shards.safe_open
    monkeypatch.setattr(shards, "safe_open", lambda *a, **k: NoTensorHandle(real(*a, **k)))
    refs = read_shard_index(path)
    assert refs[0].spec("input_ids").shape == (4,)


def test_write_leaves_no_temp_files(tmp_path):
    write_shard(tmp_path / "a.safetensors", [("x", _sample(2))])
    write_shard(tmp_path / "a.safetensors", [("y", _sample(3))])  # overwrite is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert [r.sample_id for r in read_shard_index(tmp_path / "a.safetensors")] == ["y"]


def test_failure_mid_write_leaves_no_shard(tmp_path, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 17)  # a partial file under the temp name
        raise OSError("disk full")

    monkeypatch.setattr(shards, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path / "a.safetensors", [("x", _sample(2))])
    assert list(tmp_path.iterdir()) == []


def test_shared_storage_and_views_are_written(tmp_path):
    base = torch.arange(12).reshape(2, 6)
    path = tmp_path / "v.safetensors"
    write_shard(path, [("x", {"a": base[0], "b": base[1], "c": base.t()})])
    loaded = load_sample(path, "x")
    assert torch.equal(loaded["b"], base[1]) and torch.equal(loaded["c"], base.t())


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_shard(path, [("x", _sample(8))])
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(ShardError, match=re.escape(str(path))):
        read_shard_index(path)
    with pytest.raises(ShardError, match=re.escape(str(path))):
        load_sample(path, "x")


def test_garbage_and_missing_files_name_the_file(tmp_path):
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ShardError, match=re.escape(str(garbage))):
        read_shard_index(garbage)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ShardError, match=re.escape(str(missing))):
        read_shard_index(missing)
    assert issubclass(ShardError, FeatureStoreError)


def test_foreign_safetensors_refused(tmp_path):
    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ShardError, match="not a specforge shard"):
        read_shard_index(foreign)


def test_corrupt_header_sample_list(tmp_path):
    path = tmp_path / "c.safetensors"
    meta = {"format": "specforge-shard", "schema_version": "1", "samples": "[{not json"}
    save_file({"x/input_ids": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(ShardError, match="corrupt sample list"):
        read_shard_index(path)
    meta["samples"] = json.dumps([{"sample_id": "y", "num_tokens": 2}])
    save_file({"x/input_ids": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(ShardError, match="belongs to no listed sample"):
        read_shard_index(path)


def test_header_length_lie_is_refused(tmp_path):
    path = tmp_path / "h.safetensors"
    write_shard(path, [("x", _sample(2))])
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=re.escape(str(path))):
        read_shard_index(path)


def test_missing_sample_and_bad_input(tmp_path):
    path = tmp_path / "m.safetensors"
    write_shard(path, [("x", _sample(2))])
    with pytest.raises(ShardError, match="no sample 'nope'"):
        load_sample(path, "nope")
    with pytest.raises(ValueError, match="twice"):
        write_shard(tmp_path / "d.safetensors", [("x", _sample(2)), ("x", _sample(2))])
    with pytest.raises(ValueError, match="reserved"):
        write_shard(tmp_path / "r.safetensors", [("x", _sample(2))], metadata={"samples": "[]"})
    with pytest.raises(ValueError, match="without '/'"):
        write_shard(tmp_path / "f.safetensors", [("x", {"a/b": torch.zeros(1)})])
    assert not (tmp_path / "d.safetensors").exists()
