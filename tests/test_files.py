"""specforge_lightning.files: complete-or-invisible writes."""

from __future__ import annotations

import json

import pytest

from specforge_lightning.files import (
    TEMP_MARKER,
    atomic_path,
    is_temp_name,
    temp_name,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_temp_name_is_a_hidden_sibling_with_the_marker(tmp_path):
    tmp = temp_name(tmp_path / "last.json")
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".last.json" + TEMP_MARKER)
    assert is_temp_name(tmp.name) and not is_temp_name("last.json")
    assert temp_name(tmp_path / "x") != temp_name(tmp_path / "x")


def test_writers_replace_the_file_and_leave_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    write_text_atomic(path, "text", fsync=False)
    assert path.read_text() == "text"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=2, sort_keys=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "shard.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.safetensors"]


def test_atomic_path_without_a_written_file_fails_and_cleans_up(tmp_path):
    path = tmp_path / "never.bin"
    with pytest.raises(FileNotFoundError), atomic_path(path):
        pass  # the writer wrote nothing: there is nothing to rename
    assert not path.exists() and list(tmp_path.iterdir()) == []
