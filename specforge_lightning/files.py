"""Atomic file writes: a reader sees the old file, the whole new one, or nothing.

The one home for write-to-a-temp-name-then-rename. Standard library only, so the
control plane and the checkpoint code can share it without importing torch.

Temp files are hidden siblings named ``.<name>`` + :data:`TEMP_MARKER` + a unique
suffix, in the destination's folder (``os.replace`` is atomic only within one
filesystem). Cleaners of stale temp files (e.g. the checkpoint folder's) match
that pattern: a name starting with ``.`` that contains ``TEMP_MARKER``.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_MARKER = ".tmp-"


def temp_name(path: str | os.PathLike[str]) -> Path:
    """A hidden, unique temp path next to ``path`` (pid + random, so concurrent writers never collide)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of :func:`temp_name`'s (left behind by a killed writer)."""
    return name.startswith(".") and TEMP_MARKER in name


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable; a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on failure it is removed.

    For writers that want a file name (``safetensors.torch.save_file``, ``torch.save``).
    With ``fsync`` the file and its folder are flushed to disk around the rename.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = True, fsync: bool = True
) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``json.dumps`` formatting)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys), fsync=fsync)
