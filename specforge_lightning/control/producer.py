"""The producer's control plane: stream announcement, publish order, progress and resume.

Metadata only, standard library only: this module never sees a tensor. The
capture side (``target/producer.py``) puts a sample into a FeatureStore and
hands the resulting SampleRef to :class:`Publisher`, which publishes it to the
ledger and records how far the producer got. Put-then-publish is the rule that
makes a killed producer harmless: a ref exists only for a sample already whole
in the store.

Files next to the ledger (one stream per folder)::

    ledger.sqlite              the ledger (SqliteLedger; a Redis ledger keeps these files in its URI's dir=)
    stream_manifest.json       what the stream carries (identity fields as prepare's manifest)
    vocab_mapping.safetensors  d2t / t2d of the draft vocabulary
    producer_progress.json     next task position and published count, for restarts
    producer.lock              held while a producer runs (one producer per ledger)

and in a shared-directory store's root ``owner.json``: the ledger whose stream owns the
root (and the producer's host and pid), so a second stream cannot take it over.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specforge_lightning.contracts import SampleRef
from specforge_lightning.control.ledger import Backpressure, Ledger
from specforge_lightning.control.ledger_uri import ledger_identity, stream_dir
from specforge_lightning.errors import UserError
from specforge_lightning.files import write_json_atomic

log = logging.getLogger(__name__)

STREAM_MANIFEST = "stream_manifest.json"
STREAM_VOCAB = "vocab_mapping.safetensors"
PROGRESS = "producer_progress.json"
LOCK = "producer.lock"
STREAM_FORMAT = "specforge-stream"
STORE_OWNER = "owner.json"


class StreamMismatchError(UserError, ValueError):
    """A stream manifest that is not one, or a producer announcing another stream on the same ledger."""


class StreamTimeoutError(UserError, TimeoutError):
    """No producer announced the stream in time."""


class ProducerConflictError(UserError, RuntimeError):
    """Another producer holds the ledger or the store root, or the ledger belongs to another producer's run."""


def stream_file(ledger_path: str | Path, name: str) -> Path:
    """A stream side file: it lives in the ledger's folder (a Redis ledger's ``dir=``; see ledger_uri.py)."""
    return stream_dir(ledger_path) / name


def write_stream_manifest(ledger_path: str | Path, manifest: Mapping[str, Any], identity_fields: Sequence[str]) -> Path:
    """Announce the stream. A restarted producer must announce the same identity; a different one is refused."""
    path = stream_file(ledger_path, STREAM_MANIFEST)
    existing = read_stream_manifest(ledger_path)
    if existing is not None:
        for name in identity_fields:
            if existing.get(name) != manifest.get(name):
                raise StreamMismatchError(
                    f"{path} announces a different stream ({name}: {existing.get(name)!r} there, "
                    f"{manifest.get(name)!r} now); use a fresh ledger folder for a different stream"
                )
    write_json_atomic(path, {**manifest, "format": STREAM_FORMAT})
    return path


def read_stream_manifest(ledger_path: str | Path) -> dict[str, Any] | None:
    path = stream_file(ledger_path, STREAM_MANIFEST)
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != STREAM_FORMAT:
        raise StreamMismatchError(f"{path} is not a stream manifest (format={manifest.get('format')!r})")
    return manifest


def wait_stream_manifest(ledger_path: str | Path, timeout_s: float, poll_s: float = 0.2) -> dict[str, Any]:
    """The stream manifest, waiting up to ``timeout_s`` for a producer that has not announced it yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = read_stream_manifest(ledger_path)
        if manifest is not None:
            return manifest
        if time.monotonic() >= deadline:
            raise StreamTimeoutError(
                f"no {STREAM_MANIFEST} next to {ledger_path} after {timeout_s:.0f} s: "
                "start the producer (python -m specforge_lightning produce --config ...) or check the path"
            )
        time.sleep(poll_s)


@contextmanager
def producer_lock(ledger_path: str | Path) -> Iterator[None]:
    """Hold ``producer.lock``: a second producer on the same ledger fails at once instead of interleaving."""
    path = stream_file(ledger_path, LOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProducerConflictError(f"another producer is running on {ledger_path} (it holds {path})") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def claim_store_root(root: str | Path, ledger_path: str | Path) -> Path:
    """Make ``root`` the store of the stream on ``ledger_path``; refuse a root another stream owns.

    Two streams in one root free and overwrite each other's sample files. The owner file
    names the ledger (and the producer's host and pid, for the message); the same ledger
    (a restarted producer) takes it again. Returns the owner file.
    """
    owner = Path(root).resolve() / STORE_OWNER
    owner.parent.mkdir(parents=True, exist_ok=True)
    ledger = ledger_identity(ledger_path)
    with open(owner.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # two producers starting at once: one reads what the other wrote
        try:
            held = json.loads(owner.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            held = None
        if held and held.get("ledger") != ledger:
            raise ProducerConflictError(
                f"store root {owner.parent} belongs to the stream of ledger {held.get('ledger')} (producer on "
                f"{held.get('host')}, pid {held.get('pid')}; see {owner}), not to this producer's ledger {ledger}: two "
                f"streams in one root delete each other's files. Give this stream its own store.root, or delete "
                f"{owner} once that stream is finished and drained"
            )
        write_json_atomic(owner, {"ledger": ledger, "host": socket.gethostname(), "pid": os.getpid()})
    return owner


@dataclass(frozen=True)
class ResumePoint:
    """Where a (re)started producer continues.

    ``next_index``: the first task position not yet handled. ``already_published``:
    how many of the next publishable samples the ledger holds although the
    progress file does not say so (the producer died between publish and
    progress write): they are skipped, not put again. ``check_orphan``: the
    next sample may have been put without being published; abort it first.
    """

    next_index: int
    published: int
    already_published: int
    check_orphan: bool


class ProducerProgress:
    """``producer_progress.json``: written after every publish, read on restart."""

    def __init__(self, ledger_path: str | Path) -> None:
        self.path = stream_file(ledger_path, PROGRESS)

    def read(self) -> dict[str, int] | None:
        if not self.path.exists():
            return None
        d = json.loads(self.path.read_text())
        return {"next_index": int(d["next_index"]), "published": int(d["published"])}

    def write(self, next_index: int, published: int, **info: float) -> None:
        """Record the position; ``info`` (e.g. ``samples_per_s``) is for observers such as StreamHealth."""
        # Written after every publish: no fsync (a lost write only replays what the ledger already knows).
        write_json_atomic(self.path, {**info, "next_index": next_index, "published": published}, fsync=False)

    def read_info(self) -> dict[str, float]:
        """Everything the file holds, including the producer's own rate (empty before the first write)."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def resume(self, published_in_ledger: int) -> ResumePoint:
        """Reconcile the progress file with the ledger (the source of truth for what was published)."""
        saved = self.read() or {"next_index": 0, "published": 0}
        extra = published_in_ledger - saved["published"]
        if extra not in (0, 1):
            raise ProducerConflictError(
                f"the ledger holds {published_in_ledger} refs but {self.path} says {saved['published']} were "
                "published; this ledger was written by another producer or the progress file is stale"
            )
        fresh = published_in_ledger == 0 and saved["next_index"] == 0
        return ResumePoint(saved["next_index"], published_in_ledger, extra, check_orphan=not fresh)


class Publisher:
    """Publishes refs in order, one per ledger transaction, with backpressure and progress.

    ``wait()`` blocks while the ledger's queue is above the high watermark (until it
    drops below the low one); ``publish(ref, next_index)`` makes a ref visible and
    then records the position. Counters feed the producer's log line.
    """

    def __init__(
        self,
        ledger: Ledger,
        progress: ProducerProgress,
        *,
        high_watermark: int,
        low_watermark: int,
        published: int = 0,
        log_every_s: float = 10.0,
    ) -> None:
        self.ledger = ledger
        self.progress = progress
        self.backpressure = Backpressure(ledger, high_watermark, low_watermark, poll_s=0.05)
        self.published = published
        self.published_now = 0
        self.paused_s = 0.0
        self.log_every_s = log_every_s
        self._started = time.monotonic()
        self._last_log = self._started

    def wait(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Block while paused; ``should_stop()`` (optional) aborts the wait with InterruptedError."""
        t0 = time.monotonic()
        while not self.backpressure.wait_below(timeout=0.5):
            if should_stop is not None and should_stop():
                raise InterruptedError("producer stopped while paused by backpressure")
        self.paused_s += time.monotonic() - t0

    def publish(self, ref: SampleRef, next_index: int) -> None:
        self.ledger.publish([ref])
        self.published += 1
        self.published_now += 1
        self.progress.write(next_index, self.published, samples_per_s=round(self.samples_per_s(), 3))
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("%s", self.summary_line())

    def skip(self, next_index: int) -> None:
        """Record a position that produced nothing (a sample dropped by the capture side)."""
        self.progress.write(next_index, self.published, samples_per_s=round(self.samples_per_s(), 3))

    def samples_per_s(self) -> float:
        elapsed = time.monotonic() - self._started
        return self.published_now / elapsed if elapsed > 0 else 0.0

    def summary_line(self) -> str:
        return (
            f"published {self.published} refs ({self.samples_per_s():.2f} samples/s this run), "
            f"queue depth {self.ledger.depth()}, paused {self.paused_s:.1f} s by backpressure"
        )

    def finish(self) -> None:
        self.ledger.mark_done()

    def wait_drained(self, poll_s: float = 0.2, timeout_s: float | None = None) -> bool:
        """Block until nothing is queued or leased (every ref acked or failed); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            counts = self.ledger.counts()
            if counts["queued"] == 0 and counts["leased"] == 0:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
