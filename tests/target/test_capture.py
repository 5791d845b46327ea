"""capture_in_order and epoch sample ids: prepare's batching, online."""

from __future__ import annotations

import torch

from specforge_lightning.target.capture import capture_in_order, epoch_sample_ids
from tests.data.stream_fakes import FakeEngine, H, tasks


def test_capture_in_order_uses_prepares_batching_and_resumes_inside_a_chunk():
    ts = tasks(7, lengths=[5, 3, 4, 3, 6, 2, 3])
    engine = FakeEngine(nan_ids=("t04",))
    out = list(capture_in_order(engine, ts, [0, 1, 2], chunk_size=4, batch_size=2))
    assert [pos for pos, _ in out] == list(range(7))
    assert engine.batches == [["t01", "t03"], ["t02", "t00"], ["t05", "t06"], ["t04"]]  # stable length sort per chunk
    assert out[4][1] is None and out[0][1]["last_hidden_state"].shape == (5, H)
    engine.batches.clear()
    resumed = list(capture_in_order(engine, ts, [0, 1, 2], chunk_size=4, batch_size=2, start=5))
    assert [pos for pos, _ in resumed] == [5, 6] and engine.batches == [["t05", "t06"], ["t04"]]
    assert torch.equal(resumed[0][1]["aux_hidden_states"], out[5][1]["aux_hidden_states"])


def test_epoch_sample_ids_are_unique():
    ts = tasks(3)
    assert epoch_sample_ids(ts, [0, 1, 0], 0) == ["t00", "t01", "t00#1"]
    assert epoch_sample_ids(ts, [2], 1) == ["t02@e1"]
