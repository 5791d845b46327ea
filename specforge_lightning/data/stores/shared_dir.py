"""A feature store on a shared filesystem: producers and trainers in different processes.

Each sample is one safetensors file ``{root}/samples/{id}.g{generation}.safetensors``,
published by an atomic rename, so a reader sees a whole sample or none. The
generation counter of each sample id lives in ``{root}/generations/{id}`` and
is bumped under a POSIX file lock, so every process sees the same counter.
With a shared secret ``token``, each file carries an HMAC of its sample id and
generation (never the secret itself) and a reader refuses files without a
matching one.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from safetensors import SafetensorError, safe_open

from specforge_lightning.contracts import SampleRef
from specforge_lightning.data.stores import shards
from specforge_lightning.data.stores.base import FeatureStore, FeatureStoreError, Lease, Provenance, Tensors, make_ref
from specforge_lightning.data.stores.local import check_tensors, nbytes_of

SAMPLE_FORMAT = "specforge-sample"
SAMPLE_SCHEMA_VERSION = "1"


def token_digest(token: str, sample_id: str, generation: int) -> str:
    """HMAC-SHA256 of (sample id, generation) keyed by the shared secret."""
    return hmac.new(token.encode(), f"{sample_id}\n{generation}".encode(), hashlib.sha256).hexdigest()


def _file_stem(sample_id: str) -> str:
    """A sample id as one safe file name component (no '/', never a leading dot)."""
    stem = quote(sample_id, safe="")
    return "%2E" + stem[1:] if stem.startswith(".") else stem


class SharedDirFeatureStore(FeatureStore):
    """Feature files in a shared folder, one per sample (``dir://`` refs).

    ``consume_once=True`` deletes a sample's file on release (online);
    ``False`` keeps it for later epochs. ``max_resident_bytes`` caps the total
    size of sample files in the folder: a put beyond it fails so the producer
    can back off. One producer per sample id at a time is assumed.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        consume_once: bool = True,
        max_resident_bytes: int | None = None,
        token: str | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.samples_dir = self.root / "samples"
        self.generations_dir = self.root / "generations"
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.generations_dir.mkdir(parents=True, exist_ok=True)
        self.consume_once = consume_once
        self.max_resident_bytes = max_resident_bytes
        self._token = token or None
        self._lock = threading.Lock()  # POSIX file locks are per process; this orders our own threads
        self._counts = {"puts": 0, "gets": 0, "freed": 0, "aborted": 0}

    # -- layout -------------------------------------------------------------------------

    def sample_path(self, sample_id: str, generation: int) -> Path:
        return self.samples_dir / f"{_file_stem(sample_id)}.g{generation}.safetensors"

    def latest_generation(self, sample_id: str) -> int:
        """The last generation any process issued for ``sample_id`` (0 if none)."""
        try:
            raw = (self.generations_dir / _file_stem(sample_id)).read_bytes()
        except FileNotFoundError:
            return 0
        return int(raw) if raw.strip() else 0

    def _next_generation(self, sample_id: str) -> int:
        path = self.generations_dir / _file_stem(sample_id)
        with self._lock:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                raw = os.pread(fd, 32, 0)
                generation = (int(raw) if raw.strip() else 0) + 1
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(generation).encode(), 0)
                os.fsync(fd)
            finally:
                os.close(fd)  # closing drops the lock
        return generation

    def _resident(self) -> list[tuple[Path, int]]:
        """Published sample files and their sizes (temp files start with a dot and are skipped)."""
        out = []
        with os.scandir(self.samples_dir) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.name.endswith(".safetensors"):
                    continue
                try:
                    out.append((Path(entry.path), entry.stat().st_size))
                except FileNotFoundError:  # consumed while we looked
                    pass
        return out

    # -- FeatureStore ---------------------------------------------------------------------

    def _put(self, tensors: Tensors, sample_id: str, strategy: str, provenance: Provenance) -> SampleRef:
        check_tensors(tensors, sample_id)
        nbytes = nbytes_of(tensors)
        if self.max_resident_bytes is not None:
            own = re.compile(re.escape(_file_stem(sample_id)) + r"\.g\d+\.safetensors")
            files = [(p, s) for p, s in self._resident() if not own.fullmatch(p.name)]
            resident = sum(s for _, s in files)
            if resident + nbytes > self.max_resident_bytes:
                raise FeatureStoreError(
                    f"put of sample {sample_id!r} ({nbytes} bytes) would exceed max_resident_bytes="
                    f"{self.max_resident_bytes} ({resident} bytes resident in {len(files)} files under "
                    f"{self.samples_dir}); the consumer is behind"
                )
        generation = self._next_generation(sample_id)
        meta = {
            "format": SAMPLE_FORMAT,
            "schema_version": SAMPLE_SCHEMA_VERSION,
            "sample_id": sample_id,
            "generation": str(generation),
            "strategy": strategy,
            "num_tokens": str(shards.num_tokens_of(tensors)),
            "provenance": json.dumps(dict(provenance or {}), sort_keys=True),
        }
        if self._token:
            meta["token_digest"] = token_digest(self._token, sample_id, generation)
        path = self.sample_path(sample_id, generation)
        shards.atomic_save(tensors, path, meta)
        for older in range(generation - 1, 0, -1):  # a re-put supersedes every older file
            self.sample_path(sample_id, older).unlink(missing_ok=True)
        with self._lock:
            self._counts["puts"] += 1
        return make_ref(tensors, sample_id, f"dir://{path}", strategy=strategy, generation=generation, provenance=provenance)

    def get(self, ref: SampleRef) -> tuple[dict[str, torch.Tensor], Lease]:
        if not ref.store_uri.startswith("dir://"):
            raise FeatureStoreError(f"SharedDirFeatureStore cannot read {ref.store_uri!r} (sample {ref.sample_id!r})")
        path = Path(ref.store_uri[len("dir://") :])
        expected = self.sample_path(ref.sample_id, ref.generation)
        if path != expected:
            raise FeatureStoreError(
                f"ref of sample {ref.sample_id!r} generation {ref.generation} points at {path}, "
                f"but this store keeps it at {expected}"
            )
        try:
            handle = safe_open(str(path), framework="pt")
        except FileNotFoundError:
            latest = self.latest_generation(ref.sample_id)
            if latest > ref.generation:
                raise FeatureStoreError(
                    f"stale ref for sample {ref.sample_id!r}: ref generation {ref.generation}, "
                    f"latest generation {latest} ({path} is gone)"
                ) from None
            raise FeatureStoreError(
                f"sample file {path} is missing (consumed, aborted or never published)"
            ) from None
        except (SafetensorError, OSError) as e:
            raise FeatureStoreError(f"sample file {path} is unreadable (truncated or corrupt): {e}") from e
        self._check_header(path, handle.metadata() or {}, ref)
        try:
            tensors = shards.read_tensors(path, handle, ref.feature_keys)
        except shards.ShardError as e:
            raise FeatureStoreError(f"sample {ref.sample_id!r}: {e}") from e
        with self._lock:
            self._counts["gets"] += 1
        return tensors, Lease(ref.sample_id, ref.generation, handle=path)

    def _check_header(self, path: Path, meta: Mapping[str, str], ref: SampleRef) -> None:
        if meta.get("format") != SAMPLE_FORMAT:
            raise FeatureStoreError(f"{path} is not a specforge sample file (format={meta.get('format')!r})")
        if meta.get("sample_id") != ref.sample_id or meta.get("generation") != str(ref.generation):
            raise FeatureStoreError(
                f"{path} holds sample {meta.get('sample_id')!r} generation {meta.get('generation')}, "
                f"the ref wants {ref.sample_id!r} generation {ref.generation}"
            )
        digest = meta.get("token_digest")
        if self._token is None:
            if digest is not None:
                raise FeatureStoreError(f"{path} was written with a shared-secret token but this store has none")
            return
        want = token_digest(self._token, ref.sample_id, ref.generation)
        if digest is None or not hmac.compare_digest(digest, want):
            raise FeatureStoreError(
                f"token mismatch for {path}: it was not written with this store's shared secret; refusing it"
            )

    def release(self, lease: Lease) -> None:
        """Consume-once: delete the sample file. Otherwise keep it for later epochs."""
        if not self.consume_once or lease.handle is None:
            return
        try:
            Path(lease.handle).unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._counts["freed"] += 1

    def abort(self, sample_id: str) -> None:
        removed = 0
        for generation in range(self.latest_generation(sample_id), 0, -1):
            try:
                self.sample_path(sample_id, generation).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        with self._lock:
            self._counts["aborted"] += removed

    def health(self) -> dict[str, Any]:
        files = self._resident()
        with self._lock:
            counts = dict(self._counts)
        return {
            "ok": True,
            "root": str(self.root),
            "resident_samples": len(files),
            "resident_bytes": sum(s for _, s in files),
            "max_resident_bytes": self.max_resident_bytes,
            "consume_once": self.consume_once,
            "token": self._token is not None,
            **counts,
        }
