"""The equivalence gate's Redis leg: offline prepared shards and a disaggregated run through a
shared-directory store with a Redis ledger give the same per-step losses and bit-identical final
weights, on one rank and on two gloo DDP ranks (real redis-server: tests/control/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch

from specforge_lightning.control.redis_ledger import RedisLedger
from specforge_lightning.data.stores.spec import StoreSpec
from specforge_lightning.target.producer import ProducerConfig, run_producer
from tests.control.conftest import redis_server  # noqa: F401  (the fixture, shared)
from tests.integration.conftest import assert_same_weights, prepare_dict
from tests.integration.rank_launch import run_two_ranks
from tests.integration.test_equivalence import DDP_SCRIPT, _assert_same_run, _disaggregated

pytestmark = pytest.mark.slow


def test_disaggregated_redis_ledger_equals_offline(offline_features, offline_run, tmp_path, redis_server):
    store = StoreSpec(kind="shared_dir", root=str(tmp_path / "store"))
    ledger = redis_server.url(dir=str(tmp_path / "stream"))
    run, _ = _disaggregated(offline_features, tmp_path, store, ledger=ledger)  # the producer as on another host
    _assert_same_run(run, offline_run)
    with RedisLedger(ledger) as lg:
        counts = lg.counts()
    # 4 steps x 2 samples acked; Lightning's one-batch lookahead was returned, not acked.
    assert counts == {"published": 12, "queued": 4, "leased": 0, "acked": 8, "failed": 0}
    assert (tmp_path / "stream" / "stream_manifest.json").exists()  # side files in the URI's dir=
    assert len(list((tmp_path / "store" / "samples").glob("*.safetensors"))) == 4  # acked features were freed


@pytest.mark.multiprocess
def test_two_ranks_offline_equals_disaggregated_redis(offline_features, tmp_path, redis_server):
    store = StoreSpec(kind="shared_dir", root=str(tmp_path / "store"))
    ledger = redis_server.url(dir=str(tmp_path / "stream"))
    run_producer(ProducerConfig(prepare=offline_features, ledger=ledger, store=store))
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    args = json.dumps({"prepare": prepare_dict(offline_features), "ledger": ledger,
                       "store": {"kind": "shared_dir", "root": store.root}, "out": str(tmp_path)})
    results = run_two_ranks(script, args, tmp_path)
    for rank, res in enumerate(results):
        assert res["ledger"]["ids"] == res["offline"]["ids"], rank
        assert res["ledger"]["losses"] == res["offline"]["losses"], rank
    seen = [sid for res in results for batch in res["ledger"]["ids"] for sid in batch]
    assert len(seen) == len(set(seen)) == 12  # the ranks saw disjoint samples
    for rank in range(2):
        assert_same_weights(torch.load(tmp_path / f"offline-rank{rank}.pt"), torch.load(tmp_path / f"ledger-rank{rank}.pt"))
