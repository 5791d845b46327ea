"""Prepared feature shards: several samples per safetensors file.

Safetensors only, never pickle, so opening a feature file can never run code.
A shard stores each tensor under ``"{sample_id}/{feature}"`` and lists its
samples in the header metadata, so a shard can be indexed without reading a
single tensor byte.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from specforge_lightning.contracts import FeatureSpec, SampleRef
from specforge_lightning.data.stores.base import FeatureStoreError, num_tokens_of
from specforge_lightning.errors import UserError
from specforge_lightning.files import atomic_path

SHARD_FORMAT = "specforge-shard"
SHARD_SCHEMA_VERSION = "1"
SHARD_SUFFIX = ".safetensors"
_RESERVED = ("format", "schema_version", "samples")

# safetensors header dtype codes -> torch dtype names (FeatureSpec.dtype).
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class ShardError(FeatureStoreError):
    """A shard file is missing, truncated, corrupt or not a specforge shard; the message names it."""


class ShardWriteError(UserError, ShardError):
    """A shard could not be written for a reason of the machine's (the disk is full); the message names it."""


def _disk_full(error: BaseException) -> bool:
    """ENOSPC, raised as OSError or wrapped in a safetensors error (``code: 28``, ``StorageFull``)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    return isinstance(error, SafetensorError) and ("code: 28" in text or "StorageFull" in text)


def shard_uri(path: str | Path, sample_id: str) -> str:
    """``shard:///abs/file.safetensors#id``; only ``%`` and ``#`` of the id are escaped, so it splits cleanly."""
    escaped = sample_id.replace("%", "%25").replace("#", "%23")
    return f"shard://{Path(path).resolve()}#{escaped}"


def parse_shard_uri(uri: str) -> tuple[Path, str]:
    if not uri.startswith("shard://") or "#" not in uri:
        raise ShardError(f"not a shard uri: {uri!r}")
    path, _, sid = uri[len("shard://") :].rpartition("#")
    return Path(path), unquote(sid)


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies where needed; safetensors refuses tensors that share storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"feature {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> int:
    """Write a safetensors file under a temp name in the same folder, fsync, then rename.

    Readers see either the old file, the complete new one, or nothing; never a
    half-written file. Returns the file size in bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(_cpu_tensors(tensors), str(tmp), metadata=dict(metadata))
        size = tmp.stat().st_size
    return size


def write_shard(
    path: str | Path,
    samples: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``samples`` (``(sample_id, {feature: tensor})`` pairs) as one shard, atomically.

    ``metadata`` (str -> str) is stored next to the shard's own keys; a
    ``strategy`` entry becomes each ref's strategy, the rest its provenance.
    """
    extra = dict(metadata or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"shard metadata keys {clash} are reserved")
    bad = {k: type(v).__name__ for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"shard metadata must map str to str; got {bad}")
    if not samples:
        raise ValueError(f"refusing to write an empty shard {path}")
    tensors: dict[str, torch.Tensor] = {}
    index: list[dict[str, Any]] = []
    for sample_id, features in samples:
        if not features:
            raise ValueError(f"sample {sample_id!r} has no features")
        if any(i["sample_id"] == sample_id for i in index):
            raise ValueError(f"sample {sample_id!r} appears twice in shard {path}")
        for name, t in features.items():
            if "/" in name or not name:
                raise ValueError(f"feature name {name!r} of sample {sample_id!r} must be non-empty without '/'")
            tensors[f"{sample_id}/{name}"] = t
        index.append({"sample_id": sample_id, "num_tokens": num_tokens_of(features)})
    header = {"format": SHARD_FORMAT, "schema_version": SHARD_SCHEMA_VERSION, "samples": json.dumps(index), **extra}
    try:
        atomic_save(tensors, path, header)
    except (OSError, SafetensorError) as e:
        if not _disk_full(e):
            raise
        raise ShardWriteError(
            f"no space left on the device writing shard {path} ({e}); free space under {Path(path).parent} "
            "or set output_dir elsewhere, then rerun prepare with the same config (finished shards are kept)"
        ) from e


def open_shard(path: str | Path) -> Any:
    """An open ``safe_open`` handle on a checked shard; raises ShardError naming the file."""
    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ShardError(f"cannot open shard {path}: {e}") from e
    _shard_samples(path, handle)
    return handle


def _shard_samples(path: Path, handle: Any) -> list[dict[str, Any]]:
    meta = handle.metadata() or {}
    if meta.get("format") != SHARD_FORMAT:
        raise ShardError(f"{path} is not a specforge shard (format={meta.get('format')!r})")
    if meta.get("schema_version") != SHARD_SCHEMA_VERSION:
        raise ShardError(
            f"{path} has shard schema_version {meta.get('schema_version')!r}, "
            f"this reader knows {SHARD_SCHEMA_VERSION!r}"
        )
    try:
        samples = json.loads(meta["samples"])
        for s in samples:
            str(s["sample_id"]), int(s["num_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path} has a corrupt sample list in its header: {e}") from e
    return samples


def _keys_by_sample(path: Path, handle: Any, samples: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """``{sample_id: {feature: stored key}}``; every key must belong to a listed sample."""
    by_sample: dict[str, dict[str, str]] = {str(s["sample_id"]): {} for s in samples}
    for key in handle.keys():
        sid, sep, name = key.rpartition("/")
        if not sep or sid not in by_sample:
            raise ShardError(f"{path} holds tensor {key!r} that belongs to no listed sample")
        by_sample[sid][name] = key
    empty = [sid for sid, keys in by_sample.items() if not keys]
    if empty:
        raise ShardError(f"{path} lists samples without tensors: {empty[:5]}")
    return by_sample


def read_shard_index(path: str | Path) -> list[SampleRef]:
    """One SampleRef per sample, read from the header only (no tensor is loaded)."""
    path = Path(path).resolve()
    handle = open_shard(path)
    samples = _shard_samples(path, handle)
    keys = _keys_by_sample(path, handle, samples)
    extra = {k: v for k, v in (handle.metadata() or {}).items() if k not in _RESERVED}
    strategy = extra.pop("strategy", "")
    refs = []
    for s in samples:
        sid = str(s["sample_id"])
        specs = []
        for name, key in sorted(keys[sid].items()):
            sl = handle.get_slice(key)
            code = sl.get_dtype()
            specs.append(FeatureSpec(name, tuple(int(d) for d in sl.get_shape()), _DTYPES.get(code, code.lower())))
        refs.append(
            SampleRef(
                sample_id=sid,
                store_uri=shard_uri(path, sid),
                feature_keys=dict(sorted(keys[sid].items())),
                feature_specs=tuple(specs),
                strategy=strategy,
                num_tokens=int(s["num_tokens"]),
                provenance=dict(extra),
            )
        )
    return refs


def shard_problem(path: str | Path) -> str | None:
    """Why the shard at ``path`` is unusable (missing, empty, truncated, bad header), or None.

    Cheap: the size and the header only, no tensor byte is read (safetensors checks that
    the header's offsets fit the file, so a cut-off tail is caught too).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty"
        read_shard_index(path)
    except FileNotFoundError:
        return "missing"
    except (ShardError, OSError) as e:
        return str(e)
    return None


def damaged_shards(root: str | Path, rels: Sequence[str]) -> dict[str, str]:
    """``{relative path: problem}`` for the shards of ``rels`` (under ``root``) that are unusable."""
    problems = {rel: shard_problem(Path(root) / rel) for rel in rels}
    return {rel: why for rel, why in problems.items() if why is not None}


def read_tensors(path: Path, handle: Any, keys: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Load ``{feature: stored key}`` from an open handle; a missing key is a ShardError naming the file."""
    out = {}
    for name, key in keys.items():
        try:
            out[name] = handle.get_tensor(key)
        except SafetensorError as e:
            raise ShardError(f"{path} has no tensor {key!r} (feature {name!r}): {e}") from e
    return out


def load_sample(path: str | Path, sample_id: str) -> dict[str, torch.Tensor]:
    """All features of one sample of a shard."""
    path = Path(path)
    handle = open_shard(path)
    keys = _keys_by_sample(path, handle, _shard_samples(path, handle))
    if sample_id not in keys:
        raise ShardError(f"{path} has no sample {sample_id!r}")
    return read_tensors(path, handle, keys[sample_id])
