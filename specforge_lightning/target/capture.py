"""Online capture order: a target engine over tasks, batched exactly as ``prepare`` batches them.

So an online sample (colocated thread or producer) is bit-identical to its offline
twin, and a resumed capture re-creates the very features it lost.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence

import torch

from specforge_lightning.contracts import PromptTask
from specforge_lightning.target.engine import TargetEngine


def has_nan(features: Mapping[str, torch.Tensor]) -> bool:
    """Whether a captured sample holds a NaN (such samples are dropped, offline and online alike)."""
    return any(v.is_floating_point() and bool(torch.isnan(v).any()) for v in features.values())


def capture_in_order(
    engine: TargetEngine,
    tasks: Sequence[PromptTask],
    layer_ids: Sequence[int],
    *,
    chunk_size: int,
    batch_size: int,
    start: int = 0,
    stop: threading.Event | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor] | None]]:
    """Yield ``(position, features)`` for positions ``>= start``, in task order.

    Batching is prepare's: the task list is cut into chunks of ``chunk_size``, each
    chunk is captured in batches of ``batch_size`` after a stable sort by length. A
    chunk holding ``start`` is captured whole, so resumed features equal the original
    ones. Features with a NaN come back as None (the caller drops them, as prepare does).
    """
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size}, {batch_size}")
    first = (start // chunk_size) * chunk_size
    for lo in range(first, len(tasks), chunk_size):
        chunk = tasks[lo : lo + chunk_size]
        order = sorted(range(len(chunk)), key=lambda i: chunk[i].num_tokens)
        captured: dict[int, dict[str, torch.Tensor]] = {}
        for b in range(0, len(order), batch_size):
            if stop is not None and stop.is_set():
                return
            idx = order[b : b + batch_size]
            for i, feats in zip(idx, engine.capture([chunk[i] for i in idx], layer_ids)):
                captured[i] = feats
        for i in range(len(chunk)):
            if lo + i >= start:
                feats = captured[i]
                yield lo + i, None if has_nan(feats) else feats


def epoch_sample_ids(tasks: Sequence[PromptTask], order: Sequence[int], epoch: int) -> list[str]:
    """Sample ids of one epoch: the task id (epoch 0) or ``{task_id}@e{epoch}``; repeats get ``#k``."""
    seen: dict[str, int] = {}
    out = []
    for i in order:
        sid = tasks[i].task_id if epoch == 0 else f"{tasks[i].task_id}@e{epoch}"
        k = seen.get(sid, 0)
        seen[sid] = k + 1
        out.append(sid if k == 0 else f"{sid}#{k}")
    return out
