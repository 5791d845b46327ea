"""RankedLedgerStream: round-robin rounds across ranks, reclaimed leases, schema refusals, durable commits."""

from __future__ import annotations

import pytest
import torch

from specforge_lightning.contracts import FeatureSpec, SampleRef
from specforge_lightning.control.ledger import InMemoryLedger
from specforge_lightning.data.ledger_stream import RankedLedgerStream
from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.manifest import RefCheck, StreamSchemaError
from specforge_lightning.data.stores.local import LocalFeatureStore
from tests.data.stream_fakes import MANIFEST, meta_ref, run_ranks


def test_ranks_get_round_robin_rounds_and_the_short_tail_is_dropped():
    ledger = InMemoryLedger()
    ledger.publish([meta_ref(i) for i in range(7)])
    ledger.mark_done()

    def rank(comm):
        stream = RankedLedgerStream(ledger, "job", comm=comm, poll_s=0.01)
        got = []
        while not stream.exhausted():
            got.append([r.sample_id for r in stream.get(2, 0.05)])
        return stream, got

    (s0, got0), (s1, got1) = run_ranks(2, rank)
    assert got0 == [["s0", "s2"], ["s4"], []] and got1 == [["s1", "s3"], ["s5"], []]
    assert ledger.leased_by("job-rank0") == ["s0", "s2", "s4"] and ledger.leased_by("job-rank1") == ["s1", "s3", "s5"]
    assert ledger.counts()["failed"] == 1 and s0.dropped == 1  # s6 fits no whole round: never trained

    def commit(comm):
        stream = [s0, s1][comm.rank]
        mine = {0: ["s0", "s2", "s4"], 1: ["s1", "s3", "s5"]}[comm.rank]
        stream.ack([meta_ref(int(sid[1:])) for sid in mine])  # what the loader handed over
        n = stream.commit(mine[:2])  # the optimizer stepped on the first two; the third is a lookahead
        return n, stream.close()

    results = run_ranks(2, commit)
    assert [n for n, _ in results] == [2, 2]
    assert ledger.counts()["acked"] == 4 and ledger.counts()["queued"] == 2  # s4, s5 returned by close
    assert [r.sample_id for r in ledger.lease("next", 5, 1.0)] == ["s4", "s5"]  # in their original order


def test_a_restarted_rank_reclaims_its_dead_leases_and_never_sees_acked_refs():
    ledger = InMemoryLedger()
    ledger.publish([meta_ref(i) for i in range(4)])
    first = RankedLedgerStream(ledger, "job")
    refs = first.get(3, 0)
    first.ack(refs)
    first.commit([refs[0].sample_id])
    assert first.commit([refs[0].sample_id]) == 0  # a second commit of the same ids is a no-op
    # the process dies here: no close()
    second = RankedLedgerStream(ledger, "job")
    assert second.reclaimed == 2
    ledger.mark_done()
    seen = []
    while not second.exhausted():
        seen += [r.sample_id for r in second.get(4, 0.01)]
    assert seen == ["s1", "s2", "s3"]


def test_retryable_failures_keep_their_place_without_a_retry_penalty():
    ledger = InMemoryLedger(max_attempts=1)
    ledger.publish([meta_ref(i) for i in range(3)])
    for _ in range(3):  # three runs that each stop early; max_attempts=1 must not fail the refs for good
        stream = RankedLedgerStream(ledger, "job")
        refs = stream.get(2, 0)
        stream.fail(refs, retryable=True)
        stream.close()
    assert ledger.counts() == {"published": 3, "queued": 3, "leased": 0, "acked": 0, "failed": 0}


def test_producer_failure_reaches_the_consumer():
    ledger = InMemoryLedger()
    stream = RankedLedgerStream(ledger, "job", producer_error=lambda: RuntimeError("target exploded"))
    with pytest.raises(RuntimeError, match="producer failed.*target exploded"):
        stream.get(1, 0)


def test_ref_check_names_the_sample_and_the_field():
    check = RefCheck(MANIFEST)
    specs = (FeatureSpec("input_ids", (5,), "int64"), FeatureSpec("loss_mask", (5,), "int64"),
             FeatureSpec("aux_hidden_states", (5, 12), "float32"), FeatureSpec("last_hidden_state", (5, 4), "float32"))
    keys = {s.name: s.name for s in specs}
    good = SampleRef("ok", "mem://ok", keys, specs)
    check(good)
    # The optional target_top1 may be absent (above); when present its spec is checked too.
    top1 = FeatureSpec("target_top1", (5,), "int64")
    check(SampleRef("top1", "mem://top1", {**keys, "target_top1": "target_top1"}, specs + (top1,)))
    wrong = FeatureSpec("target_top1", (5,), "float32")
    with pytest.raises(StreamSchemaError, match="'target_top1' is"):
        check(SampleRef("top1f", "mem://top1f", {**keys, "target_top1": "target_top1"}, specs + (wrong,)))
    bad_len = SampleRef("long", "mem://long", keys, tuple(FeatureSpec(s.name, (20, *s.shape[1:]), s.dtype) for s in specs))
    with pytest.raises(StreamSchemaError, match="'long' has 20 tokens"):
        check(bad_len)
    mixed = SampleRef("mixed", "mem://m", keys, specs[:3] + (FeatureSpec("last_hidden_state", (4, 4), "float32"),))
    with pytest.raises(StreamSchemaError, match="disagree on the sequence length"):
        check(mixed)
    with pytest.raises(StreamSchemaError, match="'v9' has schema_version 9"):
        check(SampleRef("v9", "mem://v9", keys, specs, schema_version=9))


def test_schema_error_fails_the_ref_for_good_and_reaches_every_rank():
    ledger = InMemoryLedger()
    bad = SampleRef("bad", "mem://bad", {"input_ids": "input_ids"})
    ledger.publish([bad])

    def rank(comm):
        stream = RankedLedgerStream(ledger, "job", comm=comm, check=RefCheck(MANIFEST))
        with pytest.raises(StreamSchemaError, match="'bad' lacks features"):
            stream.get(1, 0)
        return True

    assert run_ranks(2, rank) == [True, True]
    assert ledger.counts()["failed"] == 1


def test_loader_commit_acks_only_what_was_trained():
    """Lightning fetches one batch ahead: a commit must not ack the lookahead."""
    store = LocalFeatureStore()
    ledger = InMemoryLedger()
    ledger.publish([store.put({"input_ids": torch.arange(3) + i}, f"s{i}") for i in range(6)])
    ledger.mark_done()
    stream = RankedLedgerStream(ledger, "job", store=store, free_on_ack=True)
    loader = FeatureDataLoader(store, stream=stream, batch_size=2, ack_mode="manual", poll_timeout_s=0.01)
    it = iter(loader)
    trained, lookahead = next(it), next(it)
    loader.ack_pending()
    assert stream.commit(trained.sample_ids) == 2
    assert ledger.counts()["acked"] == 2 and stream.health()["staged"] == 2
    assert store.health()["resident_samples"] == 4  # acked features freed, the others kept
    it.close()
    stream.close()
    assert ledger.counts()["queued"] == 4
    assert [r.sample_id for r in ledger.lease("next", 2, 1.0)] == lookahead.sample_ids  # back first, in order
