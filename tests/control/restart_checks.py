"""A check shared by the SQLite and Redis ledger restart tests."""

from __future__ import annotations


def assert_restarted_ledger_state(lg) -> None:
    """Reopened after 6 published, s0-s1 acked and s2 leased by "a": acks and the unacked refs survived."""
    assert lg.counts() == {"published": 6, "queued": 3, "leased": 1, "acked": 2, "failed": 0}
    assert lg.leased_by("a") == ["s2"]
    assert lg.expire_leases(now=200.0) == 1
    assert [r.sample_id for r in lg.lease("b", 10, 60)] == ["s2", "s3", "s4", "s5"]  # nothing acked replays, nothing lost
    assert lg.ack("b", ["s0"]) == 0
