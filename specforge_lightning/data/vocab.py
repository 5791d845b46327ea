"""The draft vocabulary: the most frequent supervised target tokens.

Upstream convention: ``t2d`` bool[V] marks target ids in the draft vocab;
``d2t`` int64[Vd] holds offsets so that ``target_id = draft_id + d2t[draft_id]``.
When the corpus has fewer distinct supervised tokens than ``draft_vocab_size``,
the smallest unused ids fill the rest with count zero.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from specforge_lightning.data.manifest import REPAIR_HINT
from specforge_lightning.errors import UserError
from specforge_lightning.files import atomic_path


def count_supervised_tokens(samples: Iterable[tuple[Sequence[int], Sequence[int]]]) -> Counter:
    counts: Counter = Counter()
    for ids, mask in samples:
        counts.update(t for t, m in zip(ids, mask) if m)
    return counts


def build_vocab_mapping(counts: Counter, vocab_size: int, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if draft_vocab_size > vocab_size:
        raise ValueError(f"draft_vocab_size {draft_vocab_size} exceeds the target vocabulary {vocab_size}")
    counts = Counter({t: c for t, c in counts.items() if 0 <= t < vocab_size})
    # Pad with zero-count ids (lowest first) so there are always enough candidates.
    filler = (t for t in range(vocab_size) if t not in counts)
    while len(counts) < draft_vocab_size:
        counts[next(filler)] = 0
    # Most frequent first; ties broken by the smaller id so the mapping is deterministic.
    chosen = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:draft_vocab_size]
    used = torch.tensor(sorted(t for t, _ in chosen), dtype=torch.long)
    d2t = used - torch.arange(draft_vocab_size, dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d


def save_vocab_mapping(path: str | Path, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        save_file({"d2t": d2t.contiguous(), "t2d": t2d.contiguous()}, str(tmp))


class VocabFileError(UserError, ValueError):
    """A vocab mapping file is missing, not safetensors (e.g. a pickle put in its place) or lacks d2t/t2d."""


def vocab_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a usable vocab mapping (read from its header only), or None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except FileNotFoundError:
        return "missing"
    except (SafetensorError, OSError, ValueError) as e:
        return f"not a safetensors file ({e})"
    missing = sorted({"d2t", "t2d"} - keys)
    return f"lacks tensors {missing}" if missing else None


def check_vocab_file(path: str | Path, fix: str = f"{REPAIR_HINT} (it rewrites the file)") -> None:
    """Refuse an unusable vocab mapping file, naming it (before a training run reads it)."""
    problem = vocab_problem(path)
    if problem:
        raise VocabFileError(f"vocab mapping {path}: {problem}; {fix}")


def load_vocab_mapping(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    check_vocab_file(path)
    tensors = load_file(str(path))
    d2t, t2d = tensors["d2t"], tensors["t2d"]
    if not torch.equal(torch.nonzero(t2d).flatten(), d2t + torch.arange(len(d2t))):
        raise ValueError(f"{path}: d2t and t2d disagree (nonzero(t2d) != d2t + arange)")
    return d2t, t2d


def coverage(counts: Counter, t2d: torch.Tensor) -> float:
    """Fraction of supervised tokens whose id is in the draft vocabulary."""
    total = sum(counts.values())
    inside = sum(c for t, c in counts.items() if t < len(t2d) and t2d[t])
    return inside / total if total else 0.0
