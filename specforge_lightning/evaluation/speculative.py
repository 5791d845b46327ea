"""Greedy speculative decoding with any algorithm's drafter against a transformers target.

This is the measurement the training metrics only estimate: the target
verifies ``k`` drafted tokens in one forward pass over its KV cache, accepts
the longest prefix that equals its own greedy choices plus one bonus token,
and the draft continues from the verified text with the target's real hidden
states. The drafter comes from the algorithm (``Algorithm.make_drafter``); this module
knows only the ``Drafter`` protocol of ``algorithms.base``. Greedy (temperature 0), one sequence at a time, so the output is the
target's own greedy output token for token; only the number of target
forward passes changes. (Exactly so in float32. In bf16/fp16 a (k+1)-token
forward rounds differently from k+1 one-token forwards, so near-tied logits can
flip and the two outputs can part ways; the result counts identical outputs.)

Indexing (the draft's training alignment): draft slot ``t`` holds the target's
aux hidden state *of* token ``x_t`` next to the token *after* it, ``x_{t+1}``,
at RoPE position ``t``, and predicts ``x_{t+2}``. With ``n`` tokens known, the
target's KV cache holds positions ``0..n-2`` and the draft's cache holds slots
``0..n-2``; the last token ``x_{n-1}`` is the first input of the next verify pass.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specforge_lightning.algorithms.base import Drafter
from specforge_lightning.algorithms.metrics import simulated_acceptance_length
from specforge_lightning.runtime.progress import track
from specforge_lightning.target.hooks import capture_layer_outputs, decoder_layers

SPEEDUP_DEFINITION = (
    "speculative tokens/s / target-only greedy tokens/s, wall clock, same prompts, decoded back to back; "
    "equals target time / speculative time when both emit the same number of tokens"
)
PER_POSITION_DEFINITION = (
    "entry j (0-based): among verify steps that drafted at least j+1 tokens and accepted the first j, "
    "the fraction that also accepted draft token j+1 (conditional acceptance rate)"
)
ACCEPTANCE_LENGTH_DEFINITION = (
    "tokens emitted by verify steps / number of verify steps; a step emits its accepted draft tokens plus "
    "the target's bonus token; the first new token (from the prompt prefill) is not a verify step"
)


# --------------------------------------------------------------------------- the target


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TargetRunner:
    """One sequence through a frozen causal LM with a KV cache; returns greedy ids (and aux states).

    ``layer_ids`` are the decoder layers whose outputs the draft reads (layer i =
    output of block i, as captured for training); when given, every ``forward``
    also returns their concatenation (T, len(layer_ids)·H) for the new tokens.
    """

    def __init__(self, model: nn.Module, layer_ids: Sequence[int] = ()) -> None:
        self.model = model.eval()
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self.device = next(model.parameters()).device
        self._cache_key = _cache_kwarg(model)
        self._layers = decoder_layers(model)
        bad = [i for i in self.layer_ids if not 0 <= i < len(self._layers)]
        if bad:
            raise ValueError(f"aux layer ids {bad} are outside the target's {len(self._layers)} layers")
        self.cache: Any = None

    @property
    def length(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def reset(self) -> None:
        from transformers import DynamicCache

        try:
            self.cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x takes no config
            self.cache = DynamicCache()

    def crop(self, keep: int) -> None:
        """Keep the first ``keep`` cached positions (drop rejected draft tokens)."""
        remove = self.length - keep
        if remove > 0:
            self.cache.crop(-remove)

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], keep_logits: int | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Append ``ids`` to the cache; greedy next ids for the last ``keep_logits`` inputs (default all)."""
        if self.cache is None:
            self.reset()
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        keep = len(ids) if keep_logits is None else keep_logits
        kwargs = {self._cache_key: self.cache, "use_cache": True, "logits_to_keep": keep}
        if not self.layer_ids:
            out = self.model(input_ids=x, **kwargs)
            return out.logits[0].argmax(-1).tolist(), None
        with capture_layer_outputs(self._layers, self.layer_ids) as captured:
            out = self.model(input_ids=x, **kwargs)
        aux = torch.cat([captured[i][0] for i in self.layer_ids], dim=-1)
        return out.logits[0].argmax(-1).tolist(), aux


def greedy_generate(runner: TargetRunner, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Target-only greedy decoding, one forward per token: the reference output and the speed baseline."""
    runner.reset()
    out = [runner.forward(prompt_ids, keep_logits=1)[0][-1]]
    while len(out) < max_new_tokens and out[-1] not in eos_ids:
        out.append(runner.forward(out[-1:])[0][-1])
    return out


# --------------------------------------------------------------------------- decoding


@dataclass
class SpecTrace:
    """One prompt's speculative decode: the output and, per verify step, drafted/matched/emitted counts."""

    output_ids: list[int]
    drafted: list[int] = field(default_factory=list)
    matched: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)

    @property
    def verify_steps(self) -> int:
        return len(self.emitted)

    @property
    def acceptance_length(self) -> float:
        return sum(self.emitted) / self.verify_steps if self.verify_steps else float("nan")


def speculative_generate(
    runner: TargetRunner,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    num_draft_tokens: int,
    max_new_tokens: int,
    eos_ids: set[int],
) -> SpecTrace:
    """Greedy speculative decoding of one prompt; the output equals ``greedy_generate``'s.

    A step drafts ``min(k, tokens still allowed - 1)`` tokens, so a step never
    produces more than ``max_new_tokens`` allows. Generation stops after EOS.
    """
    if not runner.layer_ids:
        raise ValueError("speculative decoding needs a TargetRunner built with the draft's aux layer ids")
    runner.reset()
    prompt = list(prompt_ids)
    greedy, aux = runner.forward(prompt, keep_logits=1)
    trace = SpecTrace(output_ids=[greedy[-1]])
    out = trace.output_ids
    if max_new_tokens <= 1 or out[-1] in eos_ids:
        return trace
    drafter.start(aux, prompt[1:] + out)
    while len(out) < max_new_tokens:
        drafts = drafter.propose(min(num_draft_tokens, max_new_tokens - len(out) - 1))
        greedy, aux = runner.forward(out[-1:] + drafts)
        matched = 0
        while matched < len(drafts) and drafts[matched] == greedy[matched]:
            matched += 1
        new = drafts[:matched] + [greedy[matched]]
        runner.crop(runner.length - (len(drafts) - matched))  # keep x_{n-1} and the accepted drafts
        stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
        kept = new if stop is None else new[: stop + 1]
        out.extend(kept)
        trace.drafted.append(len(drafts))
        trace.matched.append(matched)
        trace.emitted.append(len(kept))
        if stop is not None:
            break
        drafter.accept(aux[: matched + 1], new)
    return trace


def per_position_acceptance(traces: Sequence[SpecTrace], k: int) -> tuple[list[float | None], list[int], list[int]]:
    """Conditional acceptance per draft position (see ``PER_POSITION_DEFINITION``): (rates, accepted, eligible)."""
    accepted, eligible = [0] * k, [0] * k
    for tr in traces:
        for drafted, matched in zip(tr.drafted, tr.matched):
            for j in range(min(drafted, matched + 1)):
                eligible[j] += 1
                accepted[j] += int(matched > j)
    rates = [a / e if e else None for a, e in zip(accepted, eligible)]
    return rates, accepted, eligible


# --------------------------------------------------------------------------- a whole evaluation


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def run_speculative_eval(
    target: nn.Module,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    eos_ids: set[int],
    warmup: bool = True,
) -> dict[str, Any]:
    """Decode every prompt target-only and speculatively; return measured and simulated numbers.

    Both decodes of a prompt run back to back, so load changes hit both alike. The
    teacher-forced accuracy (the simulated AL) is the drafter's own ``teacher_forced_counts``.
    """
    if num_draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError("num_draft_tokens and max_new_tokens must be >= 1")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    plain = TargetRunner(target)
    hooked = TargetRunner(target, drafter.layer_ids)
    device = plain.device
    k = num_draft_tokens

    if warmup:  # first calls allocate and pick kernels; keep that out of the timings
        greedy_generate(plain, prompts[0], min(4, max_new_tokens), eos_ids)
        speculative_generate(hooked, drafter, prompts[0], k, min(4, max_new_tokens), eos_ids)

    per_prompt, traces = [], []
    tf_correct, tf_total = [0] * k, [0] * k
    with track(len(prompts), "evaluate") as bar:  # plain lines in a log, a bar on a TTY
        for index, prompt in enumerate(prompts):
            reference, t_base = _timed(lambda: greedy_generate(plain, prompt, max_new_tokens, eos_ids), device)
            trace, t_spec = _timed(
                lambda: speculative_generate(hooked, drafter, prompt, k, max_new_tokens, eos_ids), device
            )
            traces.append(trace)
            c, t = drafter.teacher_forced_counts(hooked, prompt, reference, k)
            tf_correct = [a + b for a, b in zip(tf_correct, c)]
            tf_total = [a + b for a, b in zip(tf_total, t)]
            per_prompt.append(
                {
                    "index": index,
                    "prompt_tokens": len(prompt),
                    "new_tokens": len(trace.output_ids),
                    "target_new_tokens": len(reference),
                    "verify_steps": trace.verify_steps,
                    "acceptance_length": trace.acceptance_length if trace.verify_steps else None,
                    "accepted_per_step": list(trace.matched),
                    "target_seconds": t_base,
                    "speculative_seconds": t_spec,
                    "identical_to_target": trace.output_ids == reference,
                    "output_ids": list(trace.output_ids),
                }
            )
            bar.advance()

    rates, accepted, eligible = per_position_acceptance(traces, k)
    tf_acc = [c / t if t else 0.0 for c, t in zip(tf_correct, tf_total)]
    steps = sum(tr.verify_steps for tr in traces)
    emitted = sum(sum(tr.emitted) for tr in traces)
    new_tokens = sum(len(tr.output_ids) for tr in traces)
    base_tokens = sum(p["target_new_tokens"] for p in per_prompt)
    t_base = sum(p["target_seconds"] for p in per_prompt)
    t_spec = sum(p["speculative_seconds"] for p in per_prompt)
    base_tps = base_tokens / t_base if t_base > 0 else None
    spec_tps = new_tokens / t_spec if t_spec > 0 else None
    return {
        "acceptance_length": emitted / steps if steps else None,
        "acceptance_length_definition": ACCEPTANCE_LENGTH_DEFINITION,
        "simulated_acceptance_length": simulated_acceptance_length(tf_acc),
        "simulated_acceptance_length_definition": drafter.simulated_definition,
        "teacher_forced_accuracy": tf_acc,
        "teacher_forced_counts": {"correct": tf_correct, "total": tf_total},
        "per_position_acceptance": rates,
        "per_position_definition": PER_POSITION_DEFINITION,
        "per_position_counts": {"accepted": accepted, "eligible": eligible},
        "speedup": spec_tps / base_tps if spec_tps and base_tps else None,
        "speedup_definition": SPEEDUP_DEFINITION,
        "target_tokens_per_s": base_tps,
        "speculative_tokens_per_s": spec_tps,
        "target_seconds": t_base,
        "speculative_seconds": t_spec,
        "num_prompts": len(prompts),
        "new_tokens": new_tokens,
        "target_new_tokens": base_tokens,
        "verify_steps": steps,
        "identical_outputs": sum(p["identical_to_target"] for p in per_prompt),
        "per_prompt": per_prompt,
    }


__all__ = [
    "SpecTrace",
    "TargetRunner",
    "greedy_generate",
    "per_position_acceptance",
    "run_speculative_eval",
    "speculative_generate",
]
