"""Redis-only checks of the RedisLedger on a real redis-server (tests/control/conftest.py starts it):
the URI, the bounded connect, a SIGKILLed trainer's lease reclaimed after the min idle time,
two producers racing on the same ids, and a server restart with the append-only file on."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from specforge_lightning.control.ledger import LedgerClosedError
from specforge_lightning.control.ledger_uri import ledger_identity, open_ledger, stream_dir
from specforge_lightning.control.redis_ledger import (
    GROUP,
    QUEUE_CONSUMER,
    LedgerAddressError,
    LedgerConnectionError,
    RedisLedger,
    parse_redis_url,
)
from specforge_lightning.control.sqlite_ledger import SqliteLedger
from tests.control.restart_checks import assert_restarted_ledger_state
from tests.control.test_ledger import ids, ref, refs

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the URI and the connection
def test_uri_forms_and_their_errors(tmp_path):
    a = parse_redis_url("redis://:pw@10.0.0.5:6380/2?stream=run1&dir=/shared/run1")
    assert (a.host, a.port, a.db, a.stream, a.password, a.dir) == ("10.0.0.5", 6380, 2, "run1", "pw", "/shared/run1")
    assert a.display == "redis://10.0.0.5:6380/2?stream=run1"  # never the password
    assert parse_redis_url("redis://h?stream=x").port == 6379
    for bad, match in [("redis://127.0.0.1:6379/0", "names no stream"), ("http://h/0?stream=x", "not a Redis URI"),
                       ("redis://h:6379/zero?stream=x", "bad port or database")]:
        with pytest.raises(LedgerAddressError, match=match):
            parse_redis_url(bad)
    assert stream_dir("redis://h/0?stream=x&dir=" + str(tmp_path)) == tmp_path.resolve()
    assert stream_dir("redis://h/0?stream=x") == (Path("outputs") / "streams" / "x").resolve()
    assert stream_dir(tmp_path / "l.sqlite") == tmp_path.resolve()
    assert ledger_identity("redis://:secret@h:1/0?stream=x") == "redis://h:1/0?stream=x"
    assert isinstance(open_ledger(tmp_path / "l.sqlite"), SqliteLedger)


def test_an_unreachable_server_fails_fast_naming_the_address():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(LedgerConnectionError, match=f"redis://127.0.0.1:{port}/0\\?stream=x.*redis-server"):
        RedisLedger(f"redis://127.0.0.1:{port}/0?stream=x", connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 5


def test_a_server_that_never_answers_times_out_within_the_bound():
    with socket.socket() as s:  # accepts TCP connections (backlog) but never speaks Redis
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(LedgerConnectionError, match=f"127.0.0.1:{port}"):
            RedisLedger(f"redis://127.0.0.1:{port}/0?stream=x", connect_timeout_s=0.5, op_timeout_s=0.5)
        assert time.monotonic() - t0 < 10


def test_records_are_metadata_and_the_group_shows_who_holds_what(redis_server):
    with RedisLedger(redis_server.url()) as lg:
        lg.publish(refs(3))
        lg.lease("a", 2, 60)
        r = lg.client
        stream_key, rec_key = lg.keys[0], lg.keys[1]
        entry = r.xrange(stream_key, count=1)[0][1]
        assert set(entry) == {"sid", "ref"} and json.loads(entry["ref"])["sample_id"] == "s0"
        assert all(len(v) < 200 for v in r.hvals(rec_key))  # small json records, never a tensor
        owners = {p["name"]: int(p["pending"]) for p in r.xpending(stream_key, GROUP)["consumers"]}
        assert owners == {"a": 2, QUEUE_CONSUMER: 1}
        lg.ack("a", ["s0"])
        lg.fail("a", ["s1"], retryable=False)
        assert r.xpending(stream_key, GROUP)["pending"] == 1  # acked and failed left the group's pending list
        assert lg.drop() > 0 and lg.counts()["published"] == 0


# ---------------------------------------------------------------- a trainer SIGKILLed holding a lease
DYING_TRAINER = textwrap.dedent(
    """
    import os, signal, sys
    from specforge_lightning.control.redis_ledger import RedisLedger
    lg = RedisLedger(sys.argv[1])
    got = lg.lease("trainer-a", 2, float(sys.argv[2]))  # the server's clock sets the deadline
    print(",".join(r.sample_id for r in got), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.multiprocess
def test_a_sigkilled_trainers_lease_is_reclaimed_by_another_after_min_idle(redis_server, tmp_path):
    url, idle_s = redis_server.url(), 1.0
    with RedisLedger(url) as lg:
        lg.publish(refs(3))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", DYING_TRAINER, url, str(idle_s)], capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
        assert out.stdout.strip() == "s0,s1"
        t_dead = time.monotonic()
        assert ids(lg.lease("trainer-b", 10, 60)) == ["s2"]  # the dead one's refs are still leased ...
        assert sorted(lg.leased_by("trainer-a")) == ["s0", "s1"]
        time.sleep(max(0.0, idle_s + 0.2 - (time.monotonic() - t_dead)))
        assert ids(lg.lease("trainer-b", 10, 60)) == ["s0", "s1"]  # ... until they were idle for lease_s
        assert lg.leased_by("trainer-a") == []
        pending = lg.client.xpending_range(lg.keys[0], GROUP, "-", "+", 10)
        assert {p["consumer"] for p in pending} == {"trainer-b"}
        assert lg.ack("trainer-b", ["s0", "s1", "s2"]) == 3
        assert lg.counts() == {"published": 3, "queued": 0, "leased": 0, "acked": 3, "failed": 0}


# ---------------------------------------------------------------- two producers race on the same ids
def _publish_all(url: str, order: str, out: str) -> None:
    lg = RedisLedger(url)
    batch = refs(50) if order == "up" else list(reversed(refs(50)))
    new = sum(lg.publish(batch[i : i + 5]) for i in range(0, len(batch), 5))
    Path(out).write_text(str(new))
    lg.close()


@pytest.mark.multiprocess
def test_two_producers_cannot_double_publish(redis_server, tmp_path):
    url = redis_server.url()
    ctx = mp.get_context("spawn")
    outs = [str(tmp_path / f"p{i}.txt") for i in range(2)]
    procs = [ctx.Process(target=_publish_all, args=(url, order, out)) for order, out in zip(("up", "down"), outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sum(int(Path(o).read_text()) for o in outs) == 50  # every id was new for exactly one of them
    with RedisLedger(url) as lg:
        assert lg.counts() == {"published": 50, "queued": 50, "leased": 0, "acked": 0, "failed": 0}
        assert lg.client.xlen(lg.keys[0]) == 50  # one stream entry per sample
        assert sorted(ids(lg.lease("t", 100, 60))) == sorted(ids(refs(50)))


# ---------------------------------------------------------------- the server restarts
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_the_ledger_survives_a_redis_restart_with_aof(private_redis, how):
    url = private_redis.url(stream="restart")
    lg = RedisLedger(url)
    lg.publish(refs(6))
    assert ids(lg.lease("a", 3, 60, now=100.0)) == ["s0", "s1", "s2"]
    lg.ack("a", ["s0", "s1"])
    (private_redis.kill if how == "sigkill" else private_redis.stop)()
    with pytest.raises(LedgerConnectionError, match="stream=restart"):
        RedisLedger(url, connect_timeout_s=0.5)  # down: a clear error, not a hang
    private_redis.start()

    again = RedisLedger(url)
    assert_restarted_ledger_state(again)
    assert lg.counts()["leased"] == 4  # the old client reconnects on its own
    lg.close()
    again.close()
    with pytest.raises(RuntimeError, match="closed"):
        again.depth()


def test_a_done_stream_stays_done_and_refuses_publishes_across_processes(redis_server):
    url = redis_server.url()
    with RedisLedger(url) as producer:
        producer.publish([ref(0)])
        producer.mark_done()
    with RedisLedger(url) as other:
        assert other.is_done() and other.depth() == 1
        with pytest.raises(LedgerClosedError):
            other.publish([])
