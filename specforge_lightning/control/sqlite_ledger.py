"""A Ledger in one SQLite file: several trainer processes and a producer on one machine.

WAL journal with ``synchronous=FULL`` (a committed ack survives a crash), a busy
timeout so writers queue instead of failing, and ``BEGIN IMMEDIATE`` around every
read-modify-write so two processes can never lease the same ref. Reopening the
file after a crash keeps everything: acked refs stay acked, leases of dead
consumers come back through ``expire_leases`` or ``release_consumer``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from specforge_lightning.contracts import SampleRef
from specforge_lightning.control.ledger import (
    ACKED,
    FAILED,
    LEASED,
    QUEUED,
    STATES,
    Ledger,
    LedgerClosedError,
    check_lease_args,
    check_refs,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS refs (
    sample_id TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL,
    ref_json  TEXT NOT NULL,
    state     TEXT NOT NULL,
    consumer  TEXT,
    deadline  REAL NOT NULL DEFAULT 0,
    attempts  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS refs_by_state ON refs (state, seq);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""
_CHUNK = 500  # ids per IN (...) clause, well under SQLite's variable limit


class SqliteLedger(Ledger):
    """A Ledger stored in ``path``; open one object per process (threads share it under a lock)."""

    def __init__(self, path: str | Path, *, max_attempts: int = 3, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._set_wal(busy_timeout_s)
        self._db.execute("PRAGMA synchronous = FULL")
        with self._write() as db:  # executescript would commit; run the statements one by one
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    # ---------------------------------------------------------------- plumbing
    def _set_wal(self, timeout_s: float) -> None:
        """Switch to WAL; the first switch needs an exclusive lock the busy handler does not wait for."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._conn().execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: takes the write lock up front, so read-then-update is atomic."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"ledger {self.path} is closed")
        return self._db

    def _scalar(self, sql: str, *args: object) -> int:
        with self._lock:
            return int(self._conn().execute(sql, args).fetchone()[0])

    def _next_seq(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM refs").fetchone()[0])

    @staticmethod
    def _chunks(ids: list[str]) -> Iterator[list[str]]:
        for i in range(0, len(ids), _CHUNK):
            yield ids[i : i + _CHUNK]

    def _states(self, db: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[str, str | None, int]]:
        out: dict[str, tuple[str, str | None, int]] = {}
        for chunk in self._chunks(ids):
            marks = ",".join("?" * len(chunk))
            for sid, state, consumer, attempts in db.execute(
                f"SELECT sample_id, state, consumer, attempts FROM refs WHERE sample_id IN ({marks})", chunk
            ):
                out[sid] = (state, consumer, attempts)
        missing = [sid for sid in ids if sid not in out]
        if missing:
            raise KeyError(f"sample {missing[0]!r} was never published to this ledger ({len(missing)} unknown ids)")
        return out

    # ---------------------------------------------------------------- Ledger
    def publish(self, refs: Sequence[SampleRef]) -> int:
        check_refs(refs)
        rows = [(r.sample_id, r.to_json()) for r in refs]
        with self._write() as db:
            if db.execute("SELECT 1 FROM meta WHERE k = 'done'").fetchone():
                raise LedgerClosedError("the stream was marked done; cannot publish more refs")
            seq = self._next_seq(db)
            new = 0
            for sid, text in rows:
                cur = db.execute(
                    "INSERT OR IGNORE INTO refs (sample_id, seq, ref_json, state) VALUES (?, ?, ?, ?)",
                    (sid, seq, text, QUEUED),
                )
                if cur.rowcount:
                    seq += 1
                    new += 1
            return new

    def lease(self, consumer: str, max_items: int, lease_s: float, *, now: float | None = None) -> list[SampleRef]:
        check_lease_args(max_items, lease_s)
        now = time.time() if now is None else now
        with self._write() as db:
            self._expire(db, now)
            rows = db.execute(
                "SELECT sample_id, ref_json FROM refs WHERE state = ? ORDER BY seq LIMIT ?", (QUEUED, max_items)
            ).fetchall()
            db.executemany(
                "UPDATE refs SET state = ?, consumer = ?, deadline = ?, attempts = attempts + 1 WHERE sample_id = ?",
                [(LEASED, consumer, now + lease_s, sid) for sid, _ in rows],
            )
        return [SampleRef.from_json(text) for _, text in rows]

    def ack(self, consumer: str, sample_ids: Iterable[str]) -> int:
        ids = list(dict.fromkeys(sample_ids))
        with self._write() as db:
            states = self._states(db, ids)
            fresh = [sid for sid in ids if states[sid][0] != ACKED]
            db.executemany(
                "UPDATE refs SET state = ?, consumer = ?, deadline = 0 WHERE sample_id = ?",
                [(ACKED, consumer, sid) for sid in fresh],
            )
            return len(fresh)

    def fail(self, consumer: str, sample_ids: Iterable[str], retryable: bool) -> int:
        ids = list(dict.fromkeys(sample_ids))
        with self._write() as db:
            states = self._states(db, ids)
            changed = 0
            for sid in ids:
                state, owner, attempts = states[sid]
                if state != LEASED or owner != consumer:
                    continue  # not ours any more: nothing to give back
                if retryable and attempts < self.max_attempts:  # back of the queue
                    db.execute(
                        "UPDATE refs SET state = ?, consumer = NULL, deadline = 0, seq = ? WHERE sample_id = ?",
                        (QUEUED, self._next_seq(db), sid),
                    )
                else:
                    db.execute(
                        "UPDATE refs SET state = ?, consumer = NULL, deadline = 0 WHERE sample_id = ?", (FAILED, sid)
                    )
                changed += 1
            return changed

    def expire_leases(self, now: float | None = None) -> int:
        with self._write() as db:
            return self._expire(db, time.time() if now is None else now)

    @staticmethod
    def _expire(db: sqlite3.Connection, now: float) -> int:
        cur = db.execute(
            "UPDATE refs SET state = ?, consumer = NULL, deadline = 0 WHERE state = ? AND deadline <= ?",
            (QUEUED, LEASED, now),
        )
        return cur.rowcount

    def release_consumer(self, consumer: str) -> int:
        with self._write() as db:
            cur = db.execute(
                "UPDATE refs SET state = ?, consumer = NULL, deadline = 0 WHERE state = ? AND consumer = ?",
                (QUEUED, LEASED, consumer),
            )
            return cur.rowcount

    def depth(self) -> int:
        return self._scalar("SELECT COUNT(*) FROM refs WHERE state = ?", QUEUED)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn().execute("SELECT state, COUNT(*) FROM refs GROUP BY state").fetchall()
        out = {"published": 0, **{s: 0 for s in STATES}}
        for state, n in rows:
            out[state] = n
            out["published"] += n
        return out

    def leased_by(self, consumer: str) -> list[str]:
        with self._lock:
            rows = self._conn().execute(
                "SELECT sample_id FROM refs WHERE state = ? AND consumer = ? ORDER BY seq", (LEASED, consumer)
            ).fetchall()
        return [r[0] for r in rows]

    def mark_done(self) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('done', '1')")

    def is_done(self) -> bool:
        with self._lock:
            return self._conn().execute("SELECT 1 FROM meta WHERE k = 'done'").fetchone() is not None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
