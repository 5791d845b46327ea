"""The stream fault tests' Redis leg: the same faults with a Redis ledger (real redis-server), plus
the Redis server itself dying mid-stream. Nothing is lost and nothing is trained twice."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest

from specforge_lightning.control.redis_ledger import RedisLedger
from specforge_lightning.data.stores.spec import StoreSpec
from specforge_lightning.target.producer import ProducerConfig, run_producer
from tests.control.conftest import private_redis, redis_server  # noqa: F401  (the fixtures, shared)
from tests.integration.conftest import prepare_dict, run_script, tiny_prepare
from tests.integration.fault_runs import kill_trainer_at_step_2_then_restart, open_ranked_stream
from tests.integration.test_stream_faults import KILLED_PRODUCER, KILLED_TRAINER, N, Tiny

pytestmark = pytest.mark.slow


def producer_cfg(tmp_path: Path, server) -> ProducerConfig:
    store = StoreSpec(kind="shared_dir", root=str(tmp_path / "store"))
    cfg = tiny_prepare(num_samples=N, shard_size=2, batch_size=2)
    return ProducerConfig(prepare=cfg, ledger=server.url(dir=str(tmp_path / "stream")), store=store)


def counts(cfg: ProducerConfig) -> dict[str, int]:
    with RedisLedger(cfg.ledger) as ledger:
        return ledger.counts()


def published_ids(cfg: ProducerConfig) -> list[str]:
    """Every sample id the ledger ever received, in publish order (the stream's entries)."""
    with RedisLedger(cfg.ledger) as ledger:
        return [fields["sid"] for _, fields in ledger.client.xrange(ledger.keys[0])]


def consume(cfg: ProducerConfig, limit: int | None = None) -> list[str]:
    """Train-free consumer committing every batch; stops after ``limit`` samples when given."""
    ledger = RedisLedger(cfg.ledger)
    features, stream, loader = open_ranked_stream(ledger, cfg)
    seen: list[str] = []
    try:
        for batch in loader:
            seen += batch.sample_ids
            loader.ack_pending()
            stream.commit(batch.sample_ids)
            if limit is not None and len(seen) >= limit:
                break
    finally:
        stream.close()
        ledger.close()
        features.close()
    return seen


@pytest.mark.multiprocess
def test_producer_killed_in_the_middle_of_a_put_recovers_without_loss_redis(tmp_path, redis_server):
    cfg = producer_cfg(tmp_path, redis_server)
    script = tmp_path / "producer.py"
    script.write_text(KILLED_PRODUCER)
    args = {"prepare": prepare_dict(cfg.prepare), "ledger": cfg.ledger, "store": dataclasses.asdict(cfg.store), "kill_at": 4}
    out = run_script(script, json.dumps(args))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert counts(cfg)["published"] == 3  # the fourth died half-written and was never published
    stats = run_producer(cfg)  # restart: continues at position 3
    assert stats["resumed_from"] == 3 and stats["published_now"] == N - 3
    seen = consume(cfg)
    assert seen == published_ids(cfg) and len(set(seen)) == N
    assert counts(cfg) == {"published": N, "queued": 0, "leased": 0, "acked": N, "failed": 0}


@pytest.mark.multiprocess
def test_trainer_killed_before_ack_replays_exactly_the_unacked_redis(tmp_path, redis_server):
    cfg = producer_cfg(tmp_path, redis_server)
    before, module = kill_trainer_at_step_2_then_restart(cfg, tmp_path, script=KILLED_TRAINER, counts=counts,
                                                         ledger_cls=RedisLedger, module_cls=Tiny)
    assert sorted(before + module.trained) == sorted(published_ids(cfg))  # nothing unacked is lost
    assert counts(cfg) == {"published": N, "queued": 0, "leased": 0, "acked": N, "failed": 0}
    assert not list((tmp_path / "store" / "samples").glob("*.safetensors"))  # acked features were freed


def test_redis_killed_mid_stream_loses_nothing_and_replays_nothing(tmp_path, private_redis):
    cfg = producer_cfg(tmp_path, private_redis)
    run_producer(cfg)
    first = consume(cfg, limit=2)
    private_redis.kill()  # SIGKILL: only the append-only file survives (appendfsync always)
    private_redis.start()
    assert counts(cfg) == {"published": N, "queued": N - 2, "leased": 0, "acked": 2, "failed": 0}
    rest = consume(cfg)
    assert set(first).isdisjoint(rest) and sorted(first + rest) == sorted(published_ids(cfg))
    assert counts(cfg)["acked"] == N
