"""FeatureDataLoader: sharding, batching, seek/resume, prefetch, transforms and stream mode."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

import pytest
import torch
from torch.utils.data import DistributedSampler

from specforge_lightning.contracts import SampleRef
from specforge_lightning.data.loader import FeatureDataLoader, RefStream, distributed_indices, pad_collate
from specforge_lightning.data.stores.base import FeatureStoreError
from specforge_lightning.data.stores.local import LocalFeatureStore


def _filled_store(n: int, consume_once: bool = False) -> tuple[LocalFeatureStore, list[SampleRef]]:
    """Sample i has length 1 + i % 4 and every value equal to i, so a batch row names its sample."""
    store = LocalFeatureStore(consume_once=consume_once)
    refs = []
    for i in range(n):
        length = 1 + i % 4
        tensors = {"input_ids": torch.full((length,), i), "hidden_state": torch.full((length, 2), float(i))}
        refs.append(store.put(tensors, f"s{i:03d}", strategy="eagle3"))
    return store, refs


def _ids(batches) -> list[list[str]]:
    return [b.sample_ids for b in batches]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "feature-prefetch" and t.is_alive()]


@pytest.mark.parametrize("n", [1, 2, 5, 7, 10, 16])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_distributed_indices_match_distributed_sampler(n, world_size):
    for epoch in range(3):
        for rank in range(world_size):
            sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, seed=7, drop_last=False)
            sampler.set_epoch(epoch)
            assert distributed_indices(n, world_size, rank, 7, epoch) == list(sampler)
            unshuffled = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=False)
            assert distributed_indices(n, world_size, rank, 7, epoch, shuffle=False) == list(unshuffled)
    assert distributed_indices(0, 2, 1, 0, 0) == []
    with pytest.raises(ValueError, match="outside"):
        distributed_indices(4, 2, 2, 0, 0)


def test_pad_collate_pads_and_masks():
    a = {"input_ids": torch.tensor([1, 2, 3]), "h": torch.ones(3, 2), "n": torch.tensor(5)}
    b = {"input_ids": torch.tensor([4]), "h": torch.full((1, 2), 2.0), "n": torch.tensor(6)}
    out = pad_collate([a, b])
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["h"].shape == (2, 3, 2) and out["h"][1, 1:].abs().sum() == 0 and out["h"][1, 0, 0] == 2.0
    assert out["attention_mask"].dtype == torch.int64
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["n"].tolist() == [5, 6]
    own = pad_collate([{"x": torch.ones(2), "attention_mask": torch.tensor([1, 0])}])
    assert own["attention_mask"].tolist() == [[1, 0]]  # a sample's own mask is kept, not overwritten
    with pytest.raises(ValueError, match="disagree on the sequence length"):
        pad_collate([{"x": torch.ones(2), "y": torch.ones(3)}])
    with pytest.raises(ValueError, match="features"):
        pad_collate([{"x": torch.ones(2)}, {"y": torch.ones(2)}])
    with pytest.raises(ValueError, match="'x'"):
        pad_collate([{"x": torch.ones(2, 3)}, {"x": torch.ones(2, 4)}])


def test_batches_cover_the_rank_shard_and_carry_values():
    store, refs = _filled_store(10)
    loader = FeatureDataLoader(store, refs=refs, batch_size=3, seed=1, drop_last=False)
    assert len(loader) == 4
    batches = list(loader)
    order = distributed_indices(10, 1, 0, 1, 0)
    assert sum(_ids(batches), []) == [f"s{i:03d}" for i in order]
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    first = batches[0]
    assert first.strategy == "eagle3" and first.metadata["epoch"] == 0 and first.metadata["batch_index"] == 0
    for row, sid in enumerate(first.sample_ids):
        i = int(sid[1:])
        length = 1 + i % 4
        assert first.tensors["input_ids"][row, :length].eq(i).all()
        assert first.tensors["attention_mask"][row].sum() == length
    # the loader clones: changing a batch never changes the store
    first.tensors["hidden_state"].fill_(-1.0)
    again, _ = store.get(refs[int(first.sample_ids[0][1:])])
    assert again["hidden_state"].ge(0).all()


def test_drop_last_and_epochs_reshuffle():
    store, refs = _filled_store(10)
    loader = FeatureDataLoader(store, refs=refs, batch_size=3, seed=0)
    assert len(loader) == 3
    epoch0 = list(loader)
    assert [len(b) for b in epoch0] == [3, 3, 3] and loader.epoch == 1
    epoch1 = list(loader)
    assert _ids(epoch0) != _ids(epoch1) and loader.epoch == 2
    loader.set_epoch(0)
    assert _ids(list(loader)) == _ids(epoch0)


def test_ranks_partition_an_epoch():
    store, refs = _filled_store(9)
    seen = []
    for rank in range(2):
        loader = FeatureDataLoader(store, refs=refs, batch_size=2, rank=rank, world_size=2, seed=3, drop_last=False)
        assert len(loader) == 3
        seen += sum(_ids(list(loader)), [])
    assert sorted(set(seen)) == [r.sample_id for r in refs]
    assert len(seen) == 10  # DistributedSampler pads 9 samples to 10 by wrapping


def test_seek_skips_without_fetching():
    store, refs = _filled_store(8)
    full = _ids(list(FeatureDataLoader(store, refs=refs, batch_size=2)))
    gets_before = store.health()["gets"]
    loader = FeatureDataLoader(store, refs=refs, batch_size=2)
    loader.seek(3)
    assert _ids(list(loader)) == full[3:]
    assert store.health()["gets"] - gets_before == 2  # only the one remaining batch was fetched
    loader.set_epoch(0)
    assert _ids(list(loader)) == full  # seek is one-shot
    with pytest.raises(ValueError, match="a pass has 4 batches"):
        loader.seek(5)


def test_state_round_trip_resumes_mid_epoch():
    store, refs = _filled_store(11)
    reference = FeatureDataLoader(store, refs=refs, batch_size=2, seed=5)
    epoch0 = _ids(list(reference))
    assert reference.state_dict()["ranks"]["0"] == {"epoch": 1, "batches_done": 0, "seed": 5}
    epoch1 = _ids(list(reference))

    first = FeatureDataLoader(store, refs=refs, batch_size=2, seed=5)
    assert _ids(list(first)) == epoch0
    it = iter(first)
    taken = [next(it).sample_ids for _ in range(2)]
    state = first.state_dict()
    assert state["version"] == 1 and state["world_size"] == 1
    assert state["ranks"]["0"] == {"epoch": 1, "batches_done": 2, "seed": 5}
    it.close()

    resumed = FeatureDataLoader(store, refs=refs, batch_size=2, seed=5)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["ranks"]["0"]["batches_done"] == 2  # a pending seek is part of the state
    assert taken + _ids(list(resumed)) == epoch1
    assert resumed.state_dict()["ranks"]["0"] == {"epoch": 2, "batches_done": 0, "seed": 5}


def test_load_state_refuses_a_different_run():
    store, refs = _filled_store(8)
    state = FeatureDataLoader(store, refs=refs, batch_size=2, rank=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this run has world_size=4"):
        FeatureDataLoader(store, refs=refs, batch_size=2, rank=1, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="no entry for rank 0"):
        FeatureDataLoader(store, refs=refs, batch_size=2, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0 but this run has seed=9"):
        FeatureDataLoader(store, refs=refs, batch_size=2, rank=1, world_size=2, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=2 but this run has batch_size=4"):
        FeatureDataLoader(store, refs=refs, batch_size=4, rank=1, world_size=2).load_state_dict(state)
    # rank-keyed states merge: a gathered dict serves every rank
    merged = dict(state)
    merged["ranks"] = {**state["ranks"], "0": {"epoch": 3, "batches_done": 1, "seed": 0}}
    rank0 = FeatureDataLoader(store, refs=refs, batch_size=2, rank=0, world_size=2)
    rank0.load_state_dict(merged)
    assert rank0.epoch == 3 and rank0.state_dict()["ranks"]["0"]["batches_done"] == 1


def test_prefetch_gives_the_same_order_and_stops_its_thread():
    store, refs = _filled_store(13)
    plain = FeatureDataLoader(store, refs=refs, batch_size=2, seed=2)
    fetched = FeatureDataLoader(store, refs=refs, batch_size=2, seed=2, prefetch=3)
    for _ in range(2):
        a, b = list(plain), list(fetched)
        assert _ids(a) == _ids(b)
        assert all(torch.equal(x.tensors["hidden_state"], y.tensors["hidden_state"]) for x, y in zip(a, b))
    assert fetched.epoch == 2 and _prefetch_threads() == []

    it = iter(fetched)
    next(it)
    assert fetched.state_dict()["ranks"]["0"]["batches_done"] == 1  # counts yielded, not prefetched
    it.close()
    assert _prefetch_threads() == []
    it = iter(fetched)
    next(it)
    del it  # abandoned without close
    assert _prefetch_threads() == []


def test_prefetch_propagates_errors():
    store, refs = _filled_store(6)
    store.abort(refs[3].sample_id)
    loader = FeatureDataLoader(store, refs=refs, batch_size=1, shuffle=False, prefetch=2)
    it = iter(loader)
    assert [next(it).sample_ids for _ in range(3)] == [["s000"], ["s001"], ["s002"]]
    with pytest.raises(FeatureStoreError, match="s003"):
        next(it)
    assert _prefetch_threads() == []


def test_prefetch_thread_runs_on_one_intra_op_thread_and_leaves_the_consumer_its_own():
    store, refs = _filled_store(6)
    seen: list[tuple[str, int]] = []

    def record(sample):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return sample

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False, prefetch=2, transform=record)
        for _ in range(2):  # a second epoch starts a new thread
            assert len(list(loader)) == 3
            assert torch.get_num_threads() == 2
        assert seen == [("feature-prefetch", 1)] * 12
    finally:
        torch.set_num_threads(before)


def test_transform_skips_samples():
    store, refs = _filled_store(8)

    def drop_short(sample):
        return None if sample["input_ids"].numel() < 2 else sample  # e.g. too few supervised tokens

    loader = FeatureDataLoader(store, refs=refs, batch_size=2, shuffle=False, transform=drop_short)
    batches = list(loader)
    # samples 0 and 4 have length 1; batches are positions, so they just come out shorter
    assert _ids(batches) == [["s001"], ["s002", "s003"], ["s005"], ["s006", "s007"]]
    assert batches[0].metadata["skipped"] == ["s000"]
    assert loader.skipped_samples == 2

    every = FeatureDataLoader(store, refs=refs[:4], batch_size=2, shuffle=False, transform=lambda s: None)
    assert list(every) == [] and every.skipped_samples == 4 and every.epoch == 1


def test_mixed_strategies_refused():
    store, refs = _filled_store(2)
    other = store.put({"input_ids": torch.ones(2)}, "o", strategy="dflash")
    with pytest.raises(ValueError, match="mixes strategies"):
        list(FeatureDataLoader(store, refs=[refs[0], other], batch_size=2, shuffle=False))
    with pytest.raises(ValueError, match="for strategy 'dflash'"):
        list(FeatureDataLoader(store, refs=refs, batch_size=2, strategy="dflash"))


def test_constructor_checks():
    store, refs = _filled_store(2)
    with pytest.raises(ValueError, match="exactly one"):
        FeatureDataLoader(store, batch_size=1)
    with pytest.raises(ValueError, match="exactly one"):
        FeatureDataLoader(store, refs=refs, stream=ListStream([]), batch_size=1)
    with pytest.raises(ValueError, match="ack_mode"):
        FeatureDataLoader(store, stream=ListStream([]), batch_size=1, ack_mode="later")


# -- stream mode ------------------------------------------------------------------------


class ListStream:
    """A trivial in-memory RefStream: FIFO, retryable fails go back to the tail."""

    def __init__(self, refs: Sequence[SampleRef], closed: bool = True) -> None:
        self._items = deque(refs)
        self._closed = closed
        self._lock = threading.Lock()
        self.acked: list[str] = []
        self.failed: list[tuple[list[str], bool]] = []

    def push(self, ref: SampleRef) -> None:
        with self._lock:
            self._items.append(ref)

    def close(self) -> None:
        self._closed = True

    def get(self, max_items: int, timeout_s: float) -> list[SampleRef]:
        with self._lock:
            out = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
        if not out and not self._closed:
            time.sleep(min(timeout_s, 0.005))
        return out

    def ack(self, refs: Sequence[SampleRef]) -> None:
        self.acked += [r.sample_id for r in refs]

    def fail(self, refs: Sequence[SampleRef], retryable: bool) -> None:
        self.failed.append(([r.sample_id for r in refs], retryable))
        if retryable:
            with self._lock:
                self._items.extend(refs)

    def exhausted(self) -> bool:
        with self._lock:
            return self._closed and not self._items


def test_list_stream_satisfies_the_protocol():
    assert isinstance(ListStream([]), RefStream)


def test_stream_consumes_once_and_acks_on_yield():
    store, refs = _filled_store(5, consume_once=True)
    stream = ListStream(refs)
    loader = FeatureDataLoader(store, stream=stream, batch_size=2)
    batches = list(loader)
    assert _ids(batches) == [["s000", "s001"], ["s002", "s003"]]
    assert stream.acked == ["s000", "s001", "s002", "s003"]
    assert stream.failed == [(["s004"], False)]  # the short tail is given up ...
    assert store.health()["resident_samples"] == 0  # ... and its features aborted; the rest were consumed
    assert list(loader) == []  # a stream is consume-once
    with pytest.raises(RuntimeError, match="stream"):
        loader.seek(1)
    with pytest.raises(TypeError):
        len(loader)


def test_stream_keeps_short_tail_without_drop_last():
    store, refs = _filled_store(3, consume_once=True)
    stream = ListStream(refs)
    batches = list(FeatureDataLoader(store, stream=stream, batch_size=2, drop_last=False))
    assert _ids(batches) == [["s000", "s001"], ["s002"]] and stream.failed == []


def test_stream_manual_ack_and_live_producer():
    store = LocalFeatureStore(consume_once=True)
    stream = ListStream([], closed=False)

    def produce():
        for i in range(6):
            stream.push(store.put({"input_ids": torch.full((2,), i)}, f"p{i}"))
            time.sleep(0.002)
        stream.close()

    thread = threading.Thread(target=produce)
    thread.start()
    loader = FeatureDataLoader(store, stream=stream, batch_size=2, ack_mode="manual", prefetch=2, poll_timeout_s=0.01)
    seen = []
    for batch in loader:
        seen += batch.sample_ids
        assert batch.tensors["input_ids"].shape == (2, 2)
        if len(seen) == 4:
            assert stream.acked == [] and loader.ack_pending() == 4
    thread.join()
    assert seen == [f"p{i}" for i in range(6)]
    assert stream.acked == seen[:4]
    assert loader.ack_pending() == 2 and stream.acked == seen
    assert loader.state_dict()["ranks"]["0"]["batches_done"] == 3
    assert _prefetch_threads() == []


def test_abandoned_stream_hands_back_every_ref():
    store, refs = _filled_store(10, consume_once=True)
    stream = ListStream(refs)
    loader = FeatureDataLoader(store, stream=stream, batch_size=1, prefetch=3)
    it = iter(loader)
    next(it)
    deadline = time.monotonic() + 10
    while len(stream._items) > 5 and time.monotonic() < deadline:  # let the thread fill its queue
        time.sleep(0.005)
    it.close()
    assert _prefetch_threads() == []
    given_up = [sid for ids, retryable in stream.failed if not retryable for sid in ids]
    assert given_up  # prefetched from a consume-once store: not retryable
    remaining = [r.sample_id for r in stream.get(100, 0)]
    # every ref is either acked, given up, or still in the stream: none is lost
    assert sorted(stream.acked + given_up + remaining) == [r.sample_id for r in refs]
    assert stream.acked == ["s000"]


def test_stream_materialise_error_fails_the_batch():
    store, refs = _filled_store(4, consume_once=True)
    store.abort("s001")
    stream = ListStream(refs)
    it = iter(FeatureDataLoader(store, stream=stream, batch_size=2))
    with pytest.raises(FeatureStoreError, match="s001"):
        next(it)
    assert stream.failed == [(["s000", "s001"], False)]
