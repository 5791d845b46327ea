"""The one place a ``ledger`` config value becomes a Ledger, a stream folder and an identity.

``ledger:`` is either a SQLite file (``outputs/stream/ledger.sqlite``: one machine)
or a Redis URI (``redis://127.0.0.1:6379/0?stream=NAME``: several hosts). The
stream's side files (manifest, vocab mapping, producer progress and lock) live in
the SQLite file's folder, or for Redis in the URI's ``dir=`` folder (default
``outputs/streams/NAME``), which trainers on other hosts must see too (a shared
filesystem, like a shared-directory store's root).
"""

from __future__ import annotations

from pathlib import Path

from specforge_lightning.control.ledger import Ledger
from specforge_lightning.control.redis_ledger import RedisLedger, parse_redis_url
from specforge_lightning.control.sqlite_ledger import SqliteLedger

REDIS_SCHEME = "redis://"


def is_redis(ledger: str | Path) -> bool:
    """True for a Redis URI, False for a SQLite path."""
    return str(ledger).startswith(REDIS_SCHEME)


def stream_dir(ledger: str | Path) -> Path:
    """The folder of the stream's side files (absolute)."""
    if is_redis(ledger):
        address = parse_redis_url(str(ledger))
        return Path(address.dir or Path("outputs") / "streams" / address.stream).resolve()
    return Path(ledger).resolve().parent


def ledger_identity(ledger: str | Path) -> str:
    """A stable name of the ledger for owner files and messages (a Redis URI without its password)."""
    if is_redis(ledger):
        return parse_redis_url(str(ledger)).display
    return str(Path(ledger).resolve())


def open_ledger(ledger: str | Path, *, max_attempts: int = 3) -> Ledger:
    """Open the ledger a config names: SqliteLedger for a path, RedisLedger for a ``redis://`` URI."""
    if is_redis(ledger):
        return RedisLedger(str(ledger), max_attempts=max_attempts)
    return SqliteLedger(ledger, max_attempts=max_attempts)


def ledger_exists(ledger: str | Path) -> bool:
    """Whether there may be a ledger to read: a SQLite file exists; a Redis server is always asked."""
    return is_redis(ledger) or Path(ledger).exists()
