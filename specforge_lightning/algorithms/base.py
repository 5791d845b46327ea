"""The one seam between generic code and a draft algorithm.

``evaluation/``, ``export/``, ``callbacks/`` and ``cli.py`` reach an algorithm only through
an :class:`Algorithm` record from ``algorithms.registry`` and the types declared here: no
``hasattr`` probing, no algorithm names. An algorithm is one sub-package (model, loss,
module, drafter, export) whose ``__init__`` builds its ``Algorithm`` record, plus one line
in the registry (or a ``register`` call, for a plugin) and its configs.

Every field of :class:`Algorithm` is one ability, documented where it is declared (as
torchtitan's ``ModelSpec`` does); a generic module that needs a new ability adds a field
here, and every algorithm then supplies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch import nn

from specforge_lightning.contracts import StrategySpec
from specforge_lightning.errors import UserError


class DraftLoadError(UserError):
    """A file or folder that is not a loadable draft of a registered algorithm; the message names it."""


class VerifyingTarget(Protocol):
    """The target as a drafter sees it at evaluate time (``evaluation.speculative.TargetRunner``).

    ``forward(ids, keep_logits)`` appends ``ids`` to the target's KV cache and returns its greedy
    next ids for the last ``keep_logits`` inputs plus the captured aux states ``(T, k·H)`` of
    the drafter's ``layer_ids``; ``reset()`` empties the cache.
    """

    def reset(self) -> None: ...

    def forward(self, ids: Sequence[int], keep_logits: int | None = None) -> tuple[list[int], torch.Tensor | None]: ...


def teacher_forced_aux(
    runner: VerifyingTarget, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> tuple[list[int], torch.Tensor] | None:
    """``prompt + output`` ids and the target's aux states over all of them, for a drafter's teacher forcing.

    None when the output has under two tokens (nothing after the first new token to predict).
    The runner's cache is emptied before and after, so the harness's own decoding is untouched.
    """
    ids = list(prompt_ids) + list(output_ids)
    if len(ids) < len(prompt_ids) + 2:
        return None
    runner.reset()
    _, aux = runner.forward(ids, keep_logits=1)
    runner.reset()
    assert aux is not None, "the runner captures the drafter's layer_ids"
    return ids, aux


class Drafter(Protocol):
    """What the speculative-decoding harness drives: start on a prompt, propose, learn what was verified.

    Attributes:
        layer_ids: target layers whose outputs the drafter reads (what the runner captures).
        description: the drafting policy in words, recorded in the report.
        simulated_definition: what ``teacher_forced_counts`` measures, recorded in the report.
    """

    layer_ids: tuple[int, ...]
    description: str
    simulated_definition: str

    def start(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        """Feed the prompt: aux states ``(T, k·H)`` of ``x_0..x_{T-1}`` and the tokens that follow them."""

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` drafted target-vocabulary ids after the verified text."""

    def accept(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        """Feed the verified part of the last verify pass (aux states and the tokens after them)."""

    def teacher_forced_counts(
        self, runner: VerifyingTarget, prompt_ids: Sequence[int], output_ids: Sequence[int], k: int
    ) -> tuple[list[int], list[int]]:
        """Per-position ``(correct, total)`` along the target's own output: the simulated AL's inputs."""


@dataclass(frozen=True)
class TreeSpec:
    """A tree proposal's size, counted as SGLang counts it (``--speculative-num-steps/-eagle-topk/-num-draft-tokens``).

    Attributes:
        num_steps: draft forward steps, so the deepest node is ``num_steps`` tokens past the root.
        topk: children per expanded node, and nodes expanded per step (EAGLE-2's beam).
        num_draft_tokens: tokens one target forward verifies, the root (the last verified token)
            included: at most ``num_draft_tokens - 1`` drafted nodes. A chain is topk 1, num_steps + 1.
        threshold: drop (and never expand) nodes whose cumulative draft probability falls below this
            (EAGLE-2's dynamic tree); None keeps every node the size allows.
    """

    num_steps: int
    topk: int = 1
    num_draft_tokens: int | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.num_draft_tokens is None:
            object.__setattr__(self, "num_draft_tokens", self.num_steps + 1)
        if self.num_steps < 0 or self.topk < 1 or self.num_draft_tokens < 1:
            raise ValueError(f"bad tree size {self}: need num_steps >= 0, topk >= 1, num_draft_tokens >= 1")

    @property
    def max_nodes(self) -> int:
        """Drafted nodes a tree may hold (the root is not drafted)."""
        full = self.topk + (self.num_steps - 1) * self.topk**2 if self.num_steps else 0  # SGLang's candidate pool
        return min(int(self.num_draft_tokens) - 1, full)


@dataclass
class DraftTree:
    """Drafted tokens as a tree under the root (the last verified token, parent index -1).

    Nodes are ordered so that every parent precedes its children; ``scores`` are cumulative
    draft log-probabilities of the path to each node. Proposals are deterministic (top-k), so
    sampled verification treats each node's proposal distribution as a point mass.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), [0.0] * len(tokens))

    def depths(self) -> list[int]:
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))


class TreeDrafter(Protocol):
    """A ``Drafter`` that also proposes trees (an ``Algorithm`` with ``tree_drafting=True`` builds one)."""

    layer_ids: tuple[int, ...]
    description: str
    simulated_definition: str

    def start(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None: ...

    def propose(self, k: int) -> list[int]: ...

    def propose_tree(self, spec: TreeSpec) -> DraftTree:
        """A tree after the verified text; ``accept`` then gets the accepted path (aux states and tokens)."""

    def accept(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None: ...

    def teacher_forced_counts(
        self, runner: VerifyingTarget, prompt_ids: Sequence[int], output_ids: Sequence[int], k: int
    ) -> tuple[list[int], list[int]]: ...


@dataclass
class LoadedDraft:
    """A draft read back from a checkpoint or an exported folder, with what generic code checks.

    ``draft`` is the algorithm's own ``nn.Module`` (only the algorithm's exporters and drafter
    look inside it); the shape fields let ``evaluate`` check the draft against a target.
    """

    algorithm: str
    draft: nn.Module
    source: str
    kind: str  # "checkpoint", "hf" or "sglang"
    layer_ids: tuple[int, ...]
    target_hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    context: dict[str, Any] = field(default_factory=dict)
    has_embedding: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "source": self.source,
            "kind": self.kind,
            "target_id": self.context.get("target_id"),
            "aux_layer_ids": list(self.layer_ids),
            "draft_vocab_size": self.draft_vocab_size,
        }

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.draft.parameters() if p.is_floating_point()).dtype


@dataclass(frozen=True)
class LoadOptions:
    """How to read a draft: where its target lives, whether the frozen embedding is needed, trust."""

    target_dir: str | None = None
    with_embedding: bool = True
    trusted: bool = False


@dataclass(frozen=True)
class DrafterOptions:
    """How ``evaluate`` asks an algorithm to draft, beyond the draft length it passes to ``propose``.

    Attributes:
        confidence_threshold: stop a block once the draft's own predicted probability that every
            token so far is accepted falls below this (drafters with a confidence head); None: off.

    An algorithm refuses an option it does not implement (``refuse_unsupported``), so a flag is
    never silently ignored.
    """

    confidence_threshold: float | None = None

    def refuse_unsupported(self, algorithm: str, supported: Sequence[str] = ()) -> None:
        for f in fields(self):
            if f.name not in supported and getattr(self, f.name) != f.default:
                raise UserError(
                    f"evaluate: --{f.name} is not an option of {algorithm} drafting "
                    f"(it supports: {', '.join('--' + n for n in supported) or 'no drafting options'})"
                )


@dataclass(frozen=True)
class ExportFormat:
    """One export format an algorithm writes.

    Attributes:
        write: ``write(loaded, out_dir, dtype) -> folder``; ``dtype`` None keeps the format's default.
        needs_embedding: the loader must attach the frozen embedding before ``write``.
        serve_hint: the command that serves the folder (printed after the export), or None.
        description: one line for ``export --help``.
    """

    write: Callable[[LoadedDraft, Path, torch.dtype | None], Path]
    needs_embedding: bool = False
    serve_hint: Callable[[LoadedDraft, Path], str] | None = None
    description: str = ""


@dataclass(frozen=True)
class Algorithm:
    """Everything generic code may know of one algorithm.

    Attributes:
        name: registry name; also the key of its checkpoint metadata and the features' strategy.
        module: its LightningModule class (the training step the Trainer and a Fabric loop drive);
            the class declares ``strategy_spec``.
        load_checkpoint: ``(path, checkpoint dict, options) -> LoadedDraft`` for a checkpoint this
            algorithm wrote (the dict is already read, with the trust the user gave).
        owns_export: ``(config.json dict) -> bool``: is this exported folder one of ours.
        load_export: ``(folder, config.json dict, options) -> LoadedDraft``.
        exports: export formats by name (``hf``, ``sglang``, ...).
        make_drafter: ``(loaded, options) -> Drafter`` for ``evaluate``; refuses options it does not implement.
        tree_drafting: its drafter is a ``TreeDrafter`` (``evaluate --topk > 1`` / ``--draft_threshold``).
    """

    name: str
    module: type[L.LightningModule]
    load_checkpoint: Callable[[Path, Mapping[str, Any], LoadOptions], LoadedDraft]
    owns_export: Callable[[Mapping[str, Any]], bool]
    load_export: Callable[[Path, Mapping[str, Any], LoadOptions], LoadedDraft]
    exports: Mapping[str, ExportFormat]
    make_drafter: Callable[[LoadedDraft, DrafterOptions], Drafter]
    tree_drafting: bool = False

    @property
    def spec(self) -> StrategySpec:
        """The StrategySpec its module declares to the data plane."""
        return self.module.strategy_spec  # type: ignore[attr-defined]


__all__ = [
    "Algorithm",
    "DraftLoadError",
    "DraftTree",
    "Drafter",
    "ExportFormat",
    "LoadOptions",
    "LoadedDraft",
    "TreeDrafter",
    "TreeSpec",
    "VerifyingTarget",
    "teacher_forced_aux",
]
