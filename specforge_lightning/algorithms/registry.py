"""Algorithm name -> :class:`~specforge_lightning.algorithms.base.Algorithm` record, and finding a draft's owner.

Adding an algorithm is one line in ``BUILTIN`` (or a ``register`` call from a plugin package's
``__init__``). Generic code finds the owner of a checkpoint by its metadata entry and of an
exported folder by asking each algorithm whether the folder's ``config.json`` is one of its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from specforge_lightning.algorithms import dflash, domino, dspark, eagle3, peagle
from specforge_lightning.algorithms.base import Algorithm, DraftLoadError
from specforge_lightning.algorithms.draft_module import ALGORITHM_KEY
from specforge_lightning.contracts import StrategySpec

BUILTIN: tuple[Algorithm, ...] = (eagle3.ALGORITHM, dflash.ALGORITHM, domino.ALGORITHM, dspark.ALGORITHM, peagle.ALGORITHM)
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in BUILTIN}


def register(algorithm: Algorithm) -> Algorithm:
    """Add a plugin algorithm (e.g. from its package's ``__init__``); a second record under one name is refused."""
    known = ALGORITHMS.get(algorithm.name)
    if known is not None and known is not algorithm:
        raise ValueError(f"an algorithm named {algorithm.name!r} is already registered ({known.module.__qualname__})")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}") from None


def strategy_spec(name: str) -> StrategySpec:
    """The StrategySpec an algorithm declares to the data plane."""
    return get_algorithm(name).spec


def algorithm_of_module(module: Any) -> Algorithm:
    """The record of a LightningModule instance or class (its most specific registered class)."""
    cls = module if isinstance(module, type) else type(module)
    for klass in cls.__mro__:
        for algorithm in ALGORITHMS.values():
            if algorithm.module is klass:
                return algorithm
    raise KeyError(f"{cls.__qualname__} is not the module of a registered algorithm; known: {sorted(ALGORITHMS)}")


def algorithm_of_checkpoint(checkpoint: Mapping[str, Any], source: str | Path) -> Algorithm:
    """The algorithm that wrote ``checkpoint``.

    The module's metadata names it (and the module's import path, so a plugin registers itself
    by being imported, as LightningCLI imports a ``class_path``); older checkpoints are known by
    their per-algorithm entry.
    """
    meta = checkpoint.get(ALGORITHM_KEY)
    if isinstance(meta, Mapping) and isinstance(meta.get("name"), str):
        if meta["name"] not in ALGORITHMS and isinstance(meta.get("module"), str):
            importlib.import_module(meta["module"].rsplit(".", 1)[0])
        if meta["name"] in ALGORITHMS:
            return ALGORITHMS[meta["name"]]
    for algorithm in ALGORITHMS.values():
        if isinstance(checkpoint.get(algorithm.name), Mapping):
            return algorithm
    raise DraftLoadError(
        f"{source}: no registered algorithm wrote this checkpoint (known: {sorted(ALGORITHMS)}; "
        "it has no draft metadata: is it a checkpoint of a specforge_lightning fit?)"
    )


def algorithm_of_export(cfg: Mapping[str, Any], folder: str | Path) -> Algorithm:
    """The algorithm whose export ``cfg`` (a folder's config.json) is."""
    owners = [a for a in ALGORITHMS.values() if a.owns_export(cfg)]
    if not owners:
        raise DraftLoadError(
            f"{folder}: config.json describes no export of a registered algorithm "
            f"(architectures {cfg.get('architectures')}, format {cfg.get('specforge_format')!r}; known: {sorted(ALGORITHMS)})"
        )
    return owners[0]


__all__ = [
    "ALGORITHMS",
    "BUILTIN",
    "algorithm_of_checkpoint",
    "algorithm_of_export",
    "algorithm_of_module",
    "get_algorithm",
    "register",
    "strategy_spec",
]
