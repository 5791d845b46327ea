"""Speculative decoding with any algorithm's drafter against a transformers target: chains and trees.

This is the measurement the training metrics only estimate. Each verify step the drafter
proposes a chain (``Drafter.propose``) or, for an algorithm with ``tree_drafting``, a tree
(``TreeDrafter.propose_tree``, EAGLE-2/SGLang style); the target verifies all of it in ONE
forward over its KV cache (a tree through a 4D attention mask, ``runner.forward_tree``), the
longest accepted path plus one bonus token is emitted, and the cache keeps only that path.
This module knows only the protocols of ``algorithms.base``; one sequence at a time.

Greedy (temperature 0): the output is the target's own greedy output token for token; only
the number of target forwards changes. (Exactly so in float32. In bf16/fp16 a multi-token
forward rounds differently from one-token forwards, so near-tied logits can flip; the result
counts identical outputs.) Temperature > 0: speculative sampling (``sampling.verify_tree``),
seeded, distributed exactly as target-only sampling.

Indexing (the draft's training alignment): draft slot ``t`` holds the target's aux hidden
state *of* token ``x_t`` next to the token *after* it, ``x_{t+1}``, at RoPE position ``t``,
and predicts ``x_{t+2}``. With ``n`` tokens known, the target's KV cache holds positions
``0..n-2`` and the draft's cache holds slots ``0..n-2``; the last token ``x_{n-1}`` (the tree's
root) is the first input of the next verify pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn

from specforge_lightning.algorithms.base import Drafter, DraftTree, TreeDrafter, TreeSpec
from specforge_lightning.algorithms.metrics import simulated_acceptance_length
from specforge_lightning.evaluation.runner import TargetRunner, greedy_generate, sample_generate
from specforge_lightning.evaluation.sampling import Rule, SamplingParams, choose_child, target_probs, verify_tree
from specforge_lightning.runtime.progress import track

SPEEDUP_DEFINITION = (
    "speculative tokens/s / target-only tokens/s (greedy, or sampling with the same settings), wall clock, "
    "same prompts, decoded back to back; equals target time / speculative time when both emit the same "
    "number of tokens"
)
PER_POSITION_DEFINITION = (
    "entry j (0-based, = tree depth j+1): among verify steps whose draft reached depth j+1 and accepted "
    "the first j tokens, the fraction that also accepted a token at depth j+1 (conditional acceptance rate)"
)
ACCEPTANCE_LENGTH_DEFINITION = (
    "tokens emitted by verify steps / number of verify steps; a step emits its accepted draft tokens plus "
    "the target's bonus token; the first new token (from the prompt prefill) is not a verify step"
)
WASTE_DEFINITION = (
    "rejected drafted tokens / tokens the target verified (drafted tokens + one root per verify step): "
    "the share of verify work thrown away"
)


# --------------------------------------------------------------------------- decoding


@dataclass
class SpecTrace:
    """One prompt's speculative decode: the output and, per verify step, drafted/matched/emitted/depth."""

    output_ids: list[int]
    drafted: list[int] = field(default_factory=list)
    matched: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)  # the deepest drafted node (= drafted for a chain)

    @property
    def verify_steps(self) -> int:
        return len(self.emitted)

    @property
    def acceptance_length(self) -> float:
        return sum(self.emitted) / self.verify_steps if self.verify_steps else float("nan")


def _first_token(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(logits.argmax(-1))
    return int(torch.multinomial(target_probs(logits, sampling), 1, generator=generator))


def speculative_generate(
    runner: TargetRunner,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    k: int,
    max_new_tokens: int,
    eos_ids: set[int],
    *,
    tree: TreeSpec | None = None,
    sampling: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    rule: Rule = choose_child,
) -> SpecTrace:
    """Speculative decoding of one prompt; greedy, the output equals ``greedy_generate``'s.

    ``tree`` None: chain drafting, ``min(k, tokens still allowed - 1)`` tokens a step. Else the
    drafter is a ``TreeDrafter`` and each tree is at most that deep too, so a step never produces
    more than ``max_new_tokens`` allows. Generation stops after EOS. ``rule`` is the sampled
    acceptance rule (swappable so a test can show a wrong one fails).
    """
    if not runner.layer_ids:
        raise ValueError("speculative decoding needs a TargetRunner built with the draft's aux layer ids")
    runner.reset()
    prompt = list(prompt_ids)
    logits, aux = runner.forward_logits(prompt, keep_logits=1)
    trace = SpecTrace(output_ids=[_first_token(logits[-1], sampling, generator)])
    out = trace.output_ids
    if max_new_tokens <= 1 or out[-1] in eos_ids:
        return trace
    drafter.start(aux, prompt[1:] + out)
    while len(out) < max_new_tokens:
        room = max_new_tokens - len(out) - 1
        if tree is None:
            draft = DraftTree.chain(drafter.propose(min(k, room)))
        else:
            spec = replace(tree, num_steps=min(tree.num_steps, room))
            draft = cast(TreeDrafter, drafter).propose_tree(spec) if spec.num_steps else DraftTree()
        past = runner.length
        logits, aux = runner.forward_tree(out[-1], draft.tokens, draft.parents)
        path, bonus = verify_tree(logits, draft, sampling, generator, rule)
        rows = [0] + [i + 1 for i in path]
        runner.keep(past, rows)  # the cache now holds x_{n-1} and the accepted path, nothing else
        new = [draft.tokens[i] for i in path] + [bonus]
        stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
        kept = new if stop is None else new[: stop + 1]
        out.extend(kept)
        trace.drafted.append(len(draft.tokens))
        trace.matched.append(len(path))
        trace.emitted.append(len(kept))
        trace.depth.append(max(draft.depths(), default=0))
        if stop is not None:
            break
        assert aux is not None
        drafter.accept(aux[torch.tensor(rows, device=aux.device)], new)
    return trace


def per_position_acceptance(traces: Sequence[SpecTrace], k: int) -> tuple[list[float | None], list[int], list[int]]:
    """Conditional acceptance per draft depth (see ``PER_POSITION_DEFINITION``): (rates, accepted, eligible)."""
    accepted, eligible = [0] * k, [0] * k
    for tr in traces:
        for depth, matched in zip(tr.depth or tr.drafted, tr.matched):
            for j in range(min(depth, matched + 1, k)):
                eligible[j] += 1
                accepted[j] += int(matched > j)
    rates = [a / e if e else None for a, e in zip(accepted, eligible)]
    return rates, accepted, eligible


def accept_length_histogram(traces: Sequence[SpecTrace], k: int) -> list[int]:
    """Entry d: verify steps whose accepted path is exactly d drafted tokens long (d = 0..k)."""
    hist = [0] * (k + 1)
    for tr in traces:
        for m in tr.matched:
            hist[min(m, k)] += 1
    return hist


# --------------------------------------------------------------------------- a whole evaluation


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def _generator(sampling: SamplingParams, index: int, stream: int) -> torch.Generator | None:
    """One CPU generator per prompt and decode (0: target-only, 1: speculative), from ``--seed``."""
    if sampling.greedy:
        return None
    return torch.Generator().manual_seed((sampling.seed * 1_000_003 + index) * 2 + stream)


def run_speculative_eval(
    target: nn.Module,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    num_draft_tokens: int | None = None,
    tree: TreeSpec | None = None,
    sampling: SamplingParams = SamplingParams(),
    warmup: bool = True,
) -> dict[str, Any]:
    """Decode every prompt target-only and speculatively; return measured and simulated numbers.

    Chain drafting: ``num_draft_tokens`` is the chain length k (``--k``; a plain ``Drafter``).
    Tree drafting: ``tree`` (SGLang's counting), the drafter a ``TreeDrafter``. Both decodes of a
    prompt run back to back, so load changes hit both alike. The teacher-forced accuracy (the
    simulated AL) is the drafter's own ``teacher_forced_counts`` along the target-only output.
    """
    k = tree.num_steps if tree is not None else num_draft_tokens
    if k is None or k < 1 or max_new_tokens < 1:
        raise ValueError("the draft length (num_draft_tokens, or tree.num_steps) and max_new_tokens must be >= 1")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    plain = TargetRunner(target)
    hooked = TargetRunner(target, drafter.layer_ids)
    device = plain.device

    def baseline(prompt: Sequence[int], n: int, index: int) -> list[int]:
        if sampling.greedy:
            return greedy_generate(plain, prompt, n, eos_ids)
        return sample_generate(plain, prompt, n, eos_ids, sampling, _generator(sampling, index, 0))  # type: ignore[arg-type]

    def speculative(prompt: Sequence[int], n: int, index: int) -> SpecTrace:
        return speculative_generate(
            hooked, drafter, prompt, k, n, eos_ids, tree=tree, sampling=sampling, generator=_generator(sampling, index, 1)
        )

    if warmup:  # first calls allocate and pick kernels; keep that out of the timings
        baseline(prompts[0], min(4, max_new_tokens), -1)
        speculative(prompts[0], min(4, max_new_tokens), -1)

    per_prompt, traces = [], []
    tf_correct, tf_total = [0] * k, [0] * k
    with track(len(prompts), "evaluate") as bar:  # plain lines in a log, a bar on a TTY
        for index, prompt in enumerate(prompts):
            reference, t_base = _timed(lambda: baseline(prompt, max_new_tokens, index), device)
            trace, t_spec = _timed(lambda: speculative(prompt, max_new_tokens, index), device)
            traces.append(trace)
            c, t = drafter.teacher_forced_counts(hooked, prompt, reference, k)
            tf_correct = [a + b for a, b in zip(tf_correct, c)]
            tf_total = [a + b for a, b in zip(tf_total, t)]
            row = {
                "index": index,
                "prompt_tokens": len(prompt),
                "new_tokens": len(trace.output_ids),
                "target_new_tokens": len(reference),
                "verify_steps": trace.verify_steps,
                "acceptance_length": trace.acceptance_length if trace.verify_steps else None,
                "accepted_per_step": list(trace.matched),
                "drafted_per_step": list(trace.drafted),
                "target_seconds": t_base,
                "speculative_seconds": t_spec,
                "output_ids": list(trace.output_ids),
            }
            if sampling.greedy:
                row["identical_to_target"] = trace.output_ids == reference
            per_prompt.append(row)
            bar.advance()
    return _summarise(traces, per_prompt, tf_correct, tf_total, k, drafter, tree, sampling)


def _summarise(
    traces: list[SpecTrace],
    per_prompt: list[dict[str, Any]],
    tf_correct: list[int],
    tf_total: list[int],
    k: int,
    drafter: Drafter,
    tree: TreeSpec | None,
    sampling: SamplingParams,
) -> dict[str, Any]:
    rates, accepted, eligible = per_position_acceptance(traces, k)
    tf_acc = [c / t if t else 0.0 for c, t in zip(tf_correct, tf_total)]
    steps = sum(tr.verify_steps for tr in traces)
    emitted = sum(sum(tr.emitted) for tr in traces)
    drafted = sum(sum(tr.drafted) for tr in traces)
    accepted_tokens = sum(sum(tr.matched) for tr in traces)
    new_tokens = sum(len(tr.output_ids) for tr in traces)
    base_tokens = sum(p["target_new_tokens"] for p in per_prompt)
    t_base = sum(p["target_seconds"] for p in per_prompt)
    t_spec = sum(p["speculative_seconds"] for p in per_prompt)
    base_tps = base_tokens / t_base if t_base > 0 else None
    spec_tps = new_tokens / t_spec if t_spec > 0 else None
    policy = asdict(tree) if tree is not None else asdict(TreeSpec(num_steps=k))
    result: dict[str, Any] = {
        "acceptance_length": emitted / steps if steps else None,
        "acceptance_length_definition": ACCEPTANCE_LENGTH_DEFINITION,
        "simulated_acceptance_length": simulated_acceptance_length(tf_acc),
        "simulated_acceptance_length_definition": drafter.simulated_definition,
        "teacher_forced_accuracy": tf_acc,
        "teacher_forced_counts": {"correct": tf_correct, "total": tf_total},
        "per_position_acceptance": rates,
        "per_position_definition": PER_POSITION_DEFINITION,
        "per_position_counts": {"accepted": accepted, "eligible": eligible},
        "accept_length_histogram": accept_length_histogram(traces, k),
        "policy": {"kind": "tree" if tree is not None and tree.topk > 1 else "chain", **policy},
        "sampling": asdict(sampling),
        "drafted_tokens": drafted,
        "accepted_tokens": accepted_tokens,
        "rejected_tokens": drafted - accepted_tokens,
        "verified_tokens": drafted + steps,
        "mean_verify_width": (drafted + steps) / steps if steps else None,
        "wasted_verify_fraction": (drafted - accepted_tokens) / (drafted + steps) if steps else None,
        "wasted_verify_definition": WASTE_DEFINITION,
        "speedup": spec_tps / base_tps if spec_tps and base_tps else None,
        "speedup_definition": SPEEDUP_DEFINITION,
        "target_tokens_per_s": base_tps,
        "speculative_tokens_per_s": spec_tps,
        "target_seconds": t_base,
        "speculative_seconds": t_spec,
        "num_prompts": len(per_prompt),
        "new_tokens": new_tokens,
        "target_new_tokens": base_tokens,
        "verify_steps": steps,
        "per_prompt": per_prompt,
    }
    if sampling.greedy:
        result["identical_outputs"] = sum(p["identical_to_target"] for p in per_prompt)
    return result


__all__ = [
    "SpecTrace",
    "TargetRunner",
    "accept_length_histogram",
    "greedy_generate",
    "per_position_acceptance",
    "run_speculative_eval",
    "speculative_generate",
]
