"""Fakes shared by the online tests: a deterministic engine, tasks, refs, and threads standing in for ranks."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from specforge_lightning.contracts import SCHEMA_VERSION, PromptTask, SampleRef


REPO = Path(__file__).resolve().parents[2]
H = 4
MANIFEST = {"schema_version": SCHEMA_VERSION, "hidden_size": H, "layer_ids": [0, 1, 2], "capture_dtype": "float32",
            "max_length": 16}



class FakeEngine:
    """Deterministic features from token ids; records each capture batch."""

    def __init__(self, fail_after: int | None = None, nan_ids: tuple[str, ...] = ()) -> None:
        self.batches: list[list[str]] = []
        self.fail_after = fail_after
        self.nan_ids = nan_ids

    def capture(self, tasks, layer_ids):
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("target exploded")
        self.batches.append([t.task_id for t in tasks])
        out = []
        for t in tasks:
            ids = torch.tensor(t.input_ids)
            base = ids.float().unsqueeze(-1)
            last = base.repeat(1, H) + torch.arange(H)
            if t.task_id in self.nan_ids:
                last[0, 0] = float("nan")
            out.append({"input_ids": ids, "loss_mask": torch.tensor(t.loss_mask), "last_hidden_state": last,
                        "aux_hidden_states": base.repeat(1, len(layer_ids) * H)})
        return out


def tasks(n: int, lengths=None) -> list[PromptTask]:
    out = []
    for i in range(n):
        length = lengths[i] if lengths else 3 + i % 4
        out.append(PromptTask(f"t{i:02d}", tuple(range(i, i + length)), (0,) + (1,) * (length - 1)))
    return out


def meta_ref(i: int, **kw) -> SampleRef:
    return SampleRef(f"s{i}", f"mem://s{i}", {"x": "x"}, **kw)


class ThreadComm:
    """Collectives between threads, standing in for torch.distributed ranks."""

    def __init__(self, shared: dict, rank: int, world_size: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, world_size

    def _lane(self, channel: str) -> dict:
        with self.shared["lock"]:
            return self.shared.setdefault(channel, {"barrier": threading.Barrier(self.world_size), "slots": {}})

    def broadcast(self, obj, channel):
        lane = self._lane(channel)
        if self.rank == 0:
            lane["value"] = obj
        lane["barrier"].wait()
        value = lane["value"]
        lane["barrier"].wait()
        return value

    def all_gather(self, obj, channel):
        lane = self._lane(channel)
        lane["slots"][self.rank] = obj
        lane["barrier"].wait()
        out = [lane["slots"][r] for r in range(self.world_size)]
        lane["barrier"].wait()
        return out


def run_ranks(world: int, fn) -> list:
    shared = {"lock": threading.Lock()}
    results: list = [None] * world
    errors: list = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(shared, rank, world))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    return results
