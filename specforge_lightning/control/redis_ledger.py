"""A Ledger on Redis Streams: trainers and a producer on several hosts share one queue.

Every published ref is one stream entry (``sid``, ``ref`` json: metadata only) and
every entry is always pending in the consumer group ``ledger``: on the consumer
``~queue`` while it is queued, on the trainer's consumer name while it is leased,
acknowledged (XACK) once acked or failed for good. A lease moves entries with
XCLAIM; an expired lease, a released consumer and a retryable fail move them back.
So ``XPENDING`` shows who holds what, and the group is the durable hand-off.

Small keys, all under the hash tag ``{NAME}`` (one slot, so Redis Cluster works too):

    {NAME}:stream   the stream (one entry per published sample, never trimmed)
    {NAME}:rec      hash sample_id -> json {e: entry id, q: queue position, a: attempts, s: state, c: consumer}
    {NAME}:queue    sorted set of queued sample ids by queue position (publish order; retries at the tail)
    {NAME}:leases   sorted set of leased sample ids by lease deadline
    {NAME}:counts   hash state -> count;  {NAME}:seq the position counter;  {NAME}:done set at the end

Every operation is one Lua script, so it is atomic across hosts (two processes can
never lease the same ref, two producers never publish a sample twice). Deadlines use
the caller's ``now`` when given (tests) and otherwise the Redis server's clock, so
trainer hosts need not agree on the time: ``lease_s`` is the min idle time after
which another consumer reclaims a lease. Durability is the server's: run it with
``appendonly yes`` (``appendfsync always`` for acks that survive a power cut) and
``maxmemory-policy noeviction`` (see docs/scaling-out.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from specforge_lightning.contracts import SampleRef
from specforge_lightning.control.ledger import STATES, Ledger, LedgerClosedError, check_lease_args, check_refs
from specforge_lightning.errors import UserError

log = logging.getLogger(__name__)
GROUP, QUEUE_CONSUMER = "ledger", "~queue"
KEY_SUFFIXES = ("stream", "rec", "queue", "leases", "counts", "seq", "done")


class LedgerAddressError(UserError, ValueError):
    """A ``ledger`` value that is not a usable Redis ledger URI."""


class LedgerConnectionError(UserError, ConnectionError):
    """The Redis server of a ledger URI cannot be reached."""


@dataclass(frozen=True)
class RedisAddress:
    """``redis://[:password@]host[:port][/db]?stream=NAME[&dir=FOLDER]``, parsed."""

    host: str
    port: int
    db: int
    stream: str
    password: str | None = None
    dir: str | None = None

    @property
    def display(self) -> str:
        """The address for messages and identities: never the password."""
        return f"redis://{self.host}:{self.port}/{self.db}?stream={self.stream}"


def parse_redis_url(url: str) -> RedisAddress:
    """Parse a Redis ledger URI; a malformed one names the part and the fix."""
    parts = urlsplit(url)
    fix = "write it as redis://HOST:PORT/DB?stream=NAME (e.g. redis://127.0.0.1:6379/0?stream=run1)"
    if parts.scheme != "redis" or not parts.hostname:
        raise LedgerAddressError(f"ledger {url!r} is not a Redis URI: {fix}")
    query = parse_qs(parts.query)
    stream = (query.get("stream") or [""])[0]
    if not stream or any(c in stream for c in "{} "):
        raise LedgerAddressError(f"ledger {url!r} names no stream (or one with braces/spaces): {fix}")
    try:
        port = parts.port or 6379
        db = int(parts.path.strip("/") or 0)
    except ValueError:
        raise LedgerAddressError(f"ledger {url!r} has a bad port or database number: {fix}") from None
    password = unquote(parts.password) if parts.password else None
    return RedisAddress(parts.hostname, port, db, stream, password, (query.get("dir") or [None])[0])


# ---------------------------------------------------------------- the scripts
_PRELUDE = """
local S, R, Q, D, C, SEQ, DONE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local G, QC = ARGV[1], ARGV[2]
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function get(sid)
  local v = redis.call('HGET', R, sid)
  if not v then return nil end
  return cjson.decode(v)
end
local function score(x) return string.format('%.6f', x) end
local function put(sid, r) redis.call('HSET', R, sid, cjson.encode(r)) end
local function move(sid, r, to, consumer)
  redis.call('HINCRBY', C, r.s, -1)
  redis.call('HINCRBY', C, to, 1)
  r.s, r.c = to, consumer
  put(sid, r)
end
local function requeue(sid, r)
  redis.call('ZREM', D, sid)
  redis.call('ZADD', Q, r.q, sid)
  redis.call('XCLAIM', S, G, QC, 0, r.e, 'JUSTID')
  move(sid, r, 'queued', '')
end
local function expire(now)
  local due = redis.call('ZRANGEBYSCORE', D, '-inf', score(now))
  for _, sid in ipairs(due) do requeue(sid, get(sid)) end
  return #due
end
local function unknown(first)
  for i = first, #ARGV do
    if redis.call('HEXISTS', R, ARGV[i]) == 0 then return ARGV[i] end
  end
  return nil
end
local function pending_of(consumer)
  if redis.call('EXISTS', S) == 0 then return {} end
  local out = {}
  for _, p in ipairs(redis.call('XPENDING', S, G, '-', '+', 1000000000, consumer)) do
    local entry = redis.call('XRANGE', S, p[1], p[1])[1]
    local sid = entry[2][2]
    local r = get(sid)
    if r.s == 'leased' and r.c == consumer then out[#out + 1] = {sid, r} end
  end
  return out
end
"""

_PUBLISH = """
if redis.call('EXISTS', DONE) == 1 then return -1 end
if redis.call('EXISTS', S) == 0 then redis.call('XGROUP', 'CREATE', S, G, '0', 'MKSTREAM') end
local new = 0
for i = 3, #ARGV, 2 do
  local sid = ARGV[i]
  if redis.call('HEXISTS', R, sid) == 0 then
    local seq = redis.call('INCR', SEQ)
    local eid = redis.call('XADD', S, '*', 'sid', sid, 'ref', ARGV[i + 1])
    redis.call('ZADD', Q, seq, sid)
    redis.call('HINCRBY', C, 'queued', 1)
    put(sid, {e = eid, q = seq, a = 0, s = 'queued', c = ''})
    new = new + 1
  end
end
if new > 0 then redis.call('XREADGROUP', 'GROUP', G, QC, 'COUNT', new, 'STREAMS', S, '>') end
return new
"""

_LEASE = """
local consumer, n, lease_s = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local now = clock(ARGV[6])
expire(now)
local out = {}
if n == 0 then return out end
for _, sid in ipairs(redis.call('ZRANGE', Q, 0, n - 1)) do
  local r = get(sid)
  local entry = redis.call('XCLAIM', S, G, consumer, 0, r.e)[1]
  redis.call('ZREM', Q, sid)
  redis.call('ZADD', D, score(now + lease_s), sid)
  r.a = r.a + 1
  move(sid, r, 'leased', consumer)
  out[#out + 1] = entry[2][4]
end
return out
"""

_ACK = """
local bad = unknown(4)
if bad then return {-1, bad} end
local new = 0
for i = 4, #ARGV do
  local sid = ARGV[i]
  local r = get(sid)
  if r.s ~= 'acked' then
    redis.call('ZREM', Q, sid)
    redis.call('ZREM', D, sid)
    redis.call('XACK', S, G, r.e)
    move(sid, r, 'acked', ARGV[3])
    new = new + 1
  end
end
return {new}
"""

_FAIL = """
local consumer, retry, max_attempts = ARGV[3], ARGV[4] == '1', tonumber(ARGV[5])
local bad = unknown(6)
if bad then return {-1, bad} end
local changed = 0
for i = 6, #ARGV do
  local sid = ARGV[i]
  local r = get(sid)
  if r.s == 'leased' and r.c == consumer then
    if retry and r.a < max_attempts then
      r.q = redis.call('INCR', SEQ)
      requeue(sid, r)
    else
      redis.call('ZREM', D, sid)
      redis.call('XACK', S, G, r.e)
      move(sid, r, 'failed', '')
    end
    changed = changed + 1
  end
end
return {changed}
"""

_EXPIRE = "return expire(clock(ARGV[3]))"

_RELEASE = """
local mine = pending_of(ARGV[3])
for _, item in ipairs(mine) do requeue(item[1], item[2]) end
if redis.call('EXISTS', S) == 1 then redis.call('XGROUP', 'DELCONSUMER', S, G, ARGV[3]) end
return #mine
"""

_LEASED_BY = """
local out = {}
for _, item in ipairs(pending_of(ARGV[3])) do out[#out + 1] = item[1] end
return out
"""

_COUNTS = "return {redis.call('HLEN', R), redis.call('HGETALL', C)}"


class RedisLedger(Ledger):
    """A Ledger in a Redis server; open one object per process (threads share its connection pool).

    ``connect_timeout_s`` bounds the first connection (an unreachable address fails
    fast, naming it); ``op_timeout_s`` bounds each operation afterwards.
    """

    def __init__(
        self,
        url: str,
        *,
        max_attempts: int = 3,
        connect_timeout_s: float = 5.0,
        op_timeout_s: float = 30.0,
    ) -> None:
        self.address = parse_redis_url(url)
        self.max_attempts = max_attempts
        try:
            import redis
        except ImportError:
            raise LedgerConnectionError(
                f"ledger {self.address.display} needs the redis client: pip install -c constraints.txt redis"
            ) from None
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        a = self.address
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client-side retries: a lease or an ack sent twice is not idempotent, and the bounds above must hold.
        self._client: Any = redis.Redis(
            host=a.host, port=a.port, db=a.db, password=a.password, decode_responses=True,
            socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s, retry=Retry(NoBackoff(), 0),
        )
        try:
            self._client.ping()
        except self._errors as e:
            self._client.close()
            raise LedgerConnectionError(
                f"cannot reach the Redis ledger at {a.display} within {connect_timeout_s:g} s ({e}); start "
                "redis-server there (docs/scaling-out.md) or fix data.init_args.ledger"
            ) from None
        self.keys = [f"{{{a.stream}}}:{suffix}" for suffix in KEY_SUFFIXES]
        self._scripts = {
            name: self._client.register_script(_PRELUDE + body)
            for name, body in (
                ("publish", _PUBLISH), ("lease", _LEASE), ("ack", _ACK), ("fail", _FAIL), ("expire", _EXPIRE),
                ("release", _RELEASE), ("leased_by", _LEASED_BY), ("counts", _COUNTS),
            )
        }
        self._warn_on_settings()

    # ---------------------------------------------------------------- plumbing
    @property
    def client(self) -> Any:
        """The redis-py client (for inspection: XPENDING, INFO); raises once closed."""
        if self._client is None:
            raise RuntimeError(f"ledger {self.address.display} is closed")
        return self._client

    def _run(self, name: str, *args: object) -> Any:
        script = self._scripts[name]
        try:
            return script(keys=self.keys, args=[GROUP, QUEUE_CONSUMER, *args], client=self.client)
        except self._errors as e:
            raise LedgerConnectionError(f"lost the Redis ledger at {self.address.display} ({e})") from e

    def _warn_on_settings(self) -> None:
        """Settings that lose ledger state silently; CONFIG may be disabled on managed servers."""
        try:
            config = self._client.config_get("appendonly") | self._client.config_get("maxmemory-policy")
        except Exception:  # noqa: BLE001 - CONFIG renamed or forbidden: nothing to check
            return
        if config.get("appendonly") != "yes":
            log.warning("Redis at %s runs without appendonly: a restart forgets acks and leases", self.address.display)
        if config.get("maxmemory-policy", "noeviction") != "noeviction":
            log.warning("Redis at %s evicts keys (maxmemory-policy %s): set noeviction or the ledger loses refs",
                        self.address.display, config["maxmemory-policy"])

    @staticmethod
    def _checked(reply: list[Any]) -> int:
        if int(reply[0]) == -1:
            raise KeyError(f"sample {reply[1]!r} was never published to this ledger")
        return int(reply[0])

    # ---------------------------------------------------------------- Ledger
    def publish(self, refs: Sequence[SampleRef]) -> int:
        check_refs(refs)
        if not refs:
            return 0 if not self.is_done() else self._closed()
        args = [x for r in refs for x in (r.sample_id, r.to_json())]
        new = int(self._run("publish", *args))
        return self._closed() if new == -1 else new

    @staticmethod
    def _closed() -> int:
        raise LedgerClosedError("the stream was marked done; cannot publish more refs")

    def lease(self, consumer: str, max_items: int, lease_s: float, *, now: float | None = None) -> list[SampleRef]:
        check_lease_args(max_items, lease_s)
        if consumer == QUEUE_CONSUMER:
            raise ValueError(f"{QUEUE_CONSUMER!r} is the ledger's own consumer name; pick another")
        texts = self._run("lease", consumer, max_items, repr(float(lease_s)), "" if now is None else repr(float(now)))
        return [SampleRef.from_json(t) for t in texts]

    def ack(self, consumer: str, sample_ids: Iterable[str]) -> int:
        ids = list(dict.fromkeys(sample_ids))
        return self._checked(self._run("ack", consumer, *ids)) if ids else 0

    def fail(self, consumer: str, sample_ids: Iterable[str], retryable: bool) -> int:
        ids = list(dict.fromkeys(sample_ids))
        if not ids:
            return 0
        return self._checked(self._run("fail", consumer, "1" if retryable else "0", self.max_attempts, *ids))

    def expire_leases(self, now: float | None = None) -> int:
        return int(self._run("expire", "" if now is None else repr(float(now))))

    def release_consumer(self, consumer: str) -> int:
        return int(self._run("release", consumer))

    def depth(self) -> int:
        return int(self.client.hget(self.keys[4], "queued") or 0)

    def counts(self) -> dict[str, int]:
        published, flat = self._run("counts")
        out = {"published": int(published), **{s: 0 for s in STATES}}
        out.update({k: int(v) for k, v in zip(flat[::2], flat[1::2])})
        return out

    def leased_by(self, consumer: str) -> list[str]:
        return list(self._run("leased_by", consumer))

    def mark_done(self) -> None:
        self.client.set(self.keys[6], "1")

    def is_done(self) -> bool:
        return bool(self.client.exists(self.keys[6]))

    def drop(self) -> int:
        """Delete every key of this stream (a finished run's ledger); returns how many keys existed."""
        return int(self.client.delete(*self.keys))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
