"""``evaluate``'s drafting flags, counted as SGLang counts them, and the ``--sweep`` grid.

``--num_steps S --topk K --num_draft_tokens N`` mean SGLang's ``--speculative-num-steps``,
``--speculative-eagle-topk`` and ``--speculative-num-draft-tokens`` (N counts the root, the last
verified token: a chain of S drafted tokens verifies N = S + 1). ``--k`` is the chain shorthand
(topk 1, num_steps k). A chain without ``--draft_threshold`` runs through any ``Drafter``;
trees and thresholds need an algorithm that declares ``tree_drafting``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from specforge_lightning.algorithms.base import Algorithm, Drafter, TreeSpec
from specforge_lightning.errors import UserError
from specforge_lightning.evaluation.sampling import SamplingParams

DEFAULT_STEPS = 5
SWEEP_CHAIN_STEPS = (3, 5, 7)
SWEEP_TREES = ((2, 8), (2, 16), (4, 8), (4, 16))  # (topk, num_draft_tokens)
SWEEP_THRESHOLD = 0.05


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=None, help="chain shorthand: topk 1, num_steps k (default 5)")
    p.add_argument("--num_steps", type=int, default=None, help="draft steps = tree depth (SGLang --speculative-num-steps)")
    p.add_argument("--topk", type=int, default=1, help="children per expanded node (SGLang --speculative-eagle-topk)")
    p.add_argument("--num_draft_tokens", type=int, default=None,
                   help="tokens verified per target forward, the root included (SGLang --speculative-num-draft-tokens); "
                        "a chain uses num_steps + 1")
    p.add_argument("--draft_threshold", type=float, default=None,
                   help="stop extending a chain or tree branch once its cumulative draft probability falls below this")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, exact; > 0: speculative sampling")
    p.add_argument("--top_p", type=float, default=1.0, help="target top-p when sampling")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled runs (per prompt)")
    p.add_argument("--sweep", action="store_true",
                   help=f"also run chain k in {list(SWEEP_CHAIN_STEPS)}, topk x num_draft_tokens in "
                        f"{[list(t) for t in SWEEP_TREES]} and one threshold on the same prompts")


def resolve_policy(ns: argparse.Namespace) -> TreeSpec:
    """The ``TreeSpec`` the flags ask for; a user's contradiction is an error that names the flags."""
    if ns.topk < 1:
        raise UserError(f"evaluate: --topk must be >= 1, got {ns.topk}")
    if ns.draft_threshold is not None and not 0 < ns.draft_threshold < 1:
        raise UserError(f"evaluate: --draft_threshold is a probability in (0, 1), got {ns.draft_threshold}")
    if ns.k is not None:
        if ns.num_steps not in (None, ns.k) or ns.topk != 1 or ns.num_draft_tokens not in (None, ns.k + 1):
            raise UserError("evaluate: --k is the chain shorthand (topk 1, num_steps k); give --k, "
                            "or --num_steps/--topk/--num_draft_tokens, not both")
        steps = ns.k
    elif ns.num_steps is not None:
        steps = ns.num_steps
    elif ns.topk == 1 and ns.num_draft_tokens is not None:
        steps = ns.num_draft_tokens - 1
    else:
        steps = DEFAULT_STEPS
    if steps < 1:
        raise UserError(f"evaluate: the draft needs at least one step (--k / --num_steps), got {steps}")
    n = ns.num_draft_tokens
    if ns.topk == 1:
        if n not in (None, steps + 1):
            print(f"evaluate: --num_draft_tokens {n} adjusted to num_steps + 1 = {steps + 1} for topk 1 (as SGLang does)")
        n = steps + 1
    elif n is None:
        raise UserError(f"evaluate: --topk {ns.topk} needs --num_draft_tokens (tokens per verify, the root included)")
    elif n < 2:
        raise UserError(f"evaluate: --num_draft_tokens must be >= 2 (the root and one drafted token), got {n}")
    return TreeSpec(num_steps=steps, topk=ns.topk, num_draft_tokens=n, threshold=ns.draft_threshold)


def needs_tree(spec: TreeSpec) -> bool:
    """Only a plain chain runs through ``Drafter.propose``."""
    return spec.topk > 1 or spec.threshold is not None


def check_supported(algorithm: Algorithm, spec: TreeSpec) -> None:
    if needs_tree(spec) and not algorithm.tree_drafting:
        raise UserError(
            f"evaluate: --topk {spec.topk} / --draft_threshold need tree drafting, which {algorithm.name} drafts do "
            "not support; use chain drafting (--k, or --num_steps with --topk 1 and no --draft_threshold)"
        )


def describe(spec: TreeSpec, drafter: Drafter) -> str:
    if not needs_tree(spec):
        return drafter.description
    cut = f", drop nodes under cumulative draft probability {spec.threshold}" if spec.threshold else ""
    return (f"tree (EAGLE-2/SGLang): {spec.num_steps} steps, top-{spec.topk} children of the {spec.topk} best nodes "
            f"a step, best {spec.num_draft_tokens - 1} nodes verified in one forward{cut}")


def sweep_grid(spec: TreeSpec, tree_drafting: bool) -> list[TreeSpec]:
    """The ``--sweep`` policies: chains always; trees and a threshold where the algorithm drafts trees."""
    grid = [TreeSpec(num_steps=k) for k in SWEEP_CHAIN_STEPS]
    if tree_drafting:
        steps = max(spec.num_steps, DEFAULT_STEPS) if spec.topk > 1 else DEFAULT_STEPS
        grid += [TreeSpec(steps, topk, n) for topk, n in SWEEP_TREES]
        grid.append(TreeSpec(steps, 4, 16, spec.threshold or SWEEP_THRESHOLD))
    return grid


SWEEP_KEYS = (
    "acceptance_length", "speedup", "mean_verify_width", "drafted_tokens", "accepted_tokens", "rejected_tokens",
    "wasted_verify_fraction", "verify_steps", "identical_outputs", "per_position_acceptance",
)


def run_sweep(
    evaluate: Callable[..., dict[str, Any]], grid: Sequence[TreeSpec], sampling: SamplingParams
) -> list[dict[str, Any]]:
    """``evaluate(num_draft_tokens=..., tree=..., sampling=...)`` per policy; the headline numbers of each."""
    rows = []
    for spec in grid:
        tree = spec if needs_tree(spec) else None
        res = evaluate(num_draft_tokens=spec.num_steps, tree=tree, sampling=sampling)
        rows.append({"policy": {**res["policy"], "kind": "tree" if spec.topk > 1 else "chain"},
                     **{k: res.get(k) for k in SWEEP_KEYS}})
    return rows


__all__ = ["add_policy_arguments", "check_supported", "describe", "needs_tree", "resolve_policy", "run_sweep",
           "sweep_grid"]
