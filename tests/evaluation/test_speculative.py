"""The speculative decoding harness: exact greedy output, acceptance bookkeeping, simulated AL."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft
from specforge_lightning.algorithms.eagle3.drafter import Eagle3Drafter
from specforge_lightning.evaluation.speculative import (
    TargetRunner,
    greedy_generate,
    per_position_acceptance,
    run_speculative_eval,
    speculative_generate,
)

LAYERS = (1, 2, 3)
VOCAB = 96


def tiny_target(seed: int = 0) -> LlamaForCausalLM:
    """A random float32 Llama whose greedy output is varied but partly periodic (so a draft can learn it)."""
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def tiny_draft(target: LlamaForCausalLM, seed: int = 1) -> Eagle3Draft:
    config = Eagle3Config.from_target_config(target.config.to_dict(), VOCAB, LAYERS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draft = Eagle3Draft(config)
    draft.embed_tokens.weight = target.model.embed_tokens.weight.detach().clone()
    return draft.eval()


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def greedy_corpus(target: LlamaForCausalLM, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` plus the target's 24 greedy tokens each (B, L) and their aux states: a draft's training set."""
    runner = TargetRunner(target, LAYERS)
    seqs = [list(p) + greedy_generate(TargetRunner(target), p, 24, set()) for p in prompts]
    auxes = []
    for s in seqs:
        runner.reset()
        auxes.append(runner.forward(s, keep_logits=1)[1])
    return torch.tensor(seqs), torch.stack(auxes)


def train_draft(draft: Eagle3Draft, target: LlamaForCausalLM, prompts: Sequence[Sequence[int]], steps: int) -> None:
    """Fit the draft to the target's greedy continuations of ``prompts`` (TTT, 3 steps, cross-entropy)."""
    x, aux = greedy_corpus(target, prompts)
    opt = torch.optim.Adam(draft.parameters(), lr=1e-2)
    draft.train()
    for _ in range(steps):
        loss = 0.0
        for j, (logits, _) in enumerate(draft.ttt_forward(x, aux, length=3)):
            labels = x[:, 2 + j :]
            loss = loss + torch.nn.functional.cross_entropy(logits[:, : labels.shape[1]].flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    draft.eval()


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return tiny_target()


@pytest.fixture(scope="module")
def trained(target) -> Eagle3Draft:
    draft = tiny_draft(target, seed=2)
    train_draft(draft, target, make_prompts(4, 8, seed=10), steps=30)  # imperfect: partial acceptances too
    return draft


def eval_prompts() -> list[list[int]]:
    # Two prompts the draft was trained on (long acceptances) and three it never saw (rejections).
    return make_prompts(4, 8, seed=10)[:2] + [p[: 4 + 3 * i] for i, p in enumerate(make_prompts(3, 12, seed=20))]


def test_greedy_loop_matches_hf_generate(target):
    runner = TargetRunner(target)
    for prompt in make_prompts(2, 7, seed=3):
        ref = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, pad_token_id=2)
        assert greedy_generate(runner, prompt, 20, {2}) == ref[0, len(prompt) :].tolist()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_random_draft_output_identical_to_greedy(target, k):
    draft = tiny_draft(target, seed=7)
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    for prompt in eval_prompts():
        ref = greedy_generate(plain, prompt, 20, set())
        trace = speculative_generate(hooked, Eagle3Drafter(draft), prompt, k, 20, set())
        assert trace.output_ids == ref
        assert sum(trace.emitted) == len(ref) - 1 == trace.verify_steps * trace.acceptance_length


@pytest.mark.parametrize("k", [1, 3, 5])
def test_trained_draft_output_identical_with_multi_token_acceptance(target, trained, k):
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    drafter = Eagle3Drafter(trained)  # one drafter reused across prompts, as the evaluator does
    traces = []
    for prompt in eval_prompts():
        ref = greedy_generate(plain, prompt, 30, set())
        trace = speculative_generate(hooked, drafter, prompt, k, 30, set())
        assert trace.output_ids == ref
        assert all(m <= d for m, d in zip(trace.matched, trace.drafted))
        traces.append(trace)
    matched = [m for t in traces for m in t.matched]
    assert max(matched) == k  # full acceptances happen
    if k > 1:
        partial = [(m, d) for t in traces for m, d in zip(t.matched, t.drafted) if 0 < m < d]
        assert partial, "expected steps that accept some draft tokens and reject the rest"
        seen = traces[:2]  # prompts the draft was trained on: far fewer target passes than tokens
        assert sum(t.verify_steps for t in seen) < 0.5 * sum(len(t.output_ids) - 1 for t in seen)


def test_eos_stops_generation_like_greedy(target, trained):
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    prompt = eval_prompts()[0]
    free = greedy_generate(plain, prompt, 30, set())
    eos = {free[9]}  # a token the target emits mid-way (inside a drafted run for the trained draft)
    ref = greedy_generate(plain, prompt, 30, eos)
    trace = speculative_generate(hooked, Eagle3Drafter(trained), prompt, 4, 30, eos)
    assert trace.output_ids == ref and ref[-1] in eos and len(ref) <= 10


class ScriptedDrafter:
    """Knows the target's greedy output; proposes ``schedule[i]`` right tokens, then wrong ones."""

    def __init__(self, full: list[int], schedule: list[int]) -> None:
        self.full, self.schedule, self.known, self.calls = full, list(schedule), 0, []

    def start(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        assert aux.shape[0] == len(next_ids)
        self.known = len(next_ids) + 1

    def propose(self, k: int) -> list[int]:
        right = min(self.schedule.pop(0), k)
        truth = self.full[self.known : self.known + k]
        self.calls.append(k)
        return truth[:right] + [(t + 1) % VOCAB for t in truth[right:]]

    def accept(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        assert aux.shape[0] == len(next_ids)
        assert list(next_ids) == self.full[self.known : self.known + len(next_ids)]
        self.known += len(next_ids)


def test_acceptance_length_hand_checked(target):
    prompt = make_prompts(1, 6, seed=4)[0]
    full = prompt + greedy_generate(TargetRunner(target), prompt, 40, set())
    drafter = ScriptedDrafter(full, schedule=[3, 1, 0, 1])
    trace = speculative_generate(TargetRunner(target, LAYERS), drafter, prompt, 3, 10, set())
    # 10 new tokens: 1 from the prefill, then steps drafting min(3, room-1) tokens:
    # (drafted 3, matched 3) -> 4, (3, 1) -> 2, (2, 0) -> 1, (1, 1) -> 2.  AL = 9 / 4.
    assert drafter.calls == [3, 3, 2, 1]
    assert (trace.drafted, trace.matched, trace.emitted) == ([3, 3, 2, 1], [3, 1, 0, 1], [4, 2, 1, 2])
    assert trace.output_ids == full[len(prompt) : len(prompt) + 10]
    assert trace.acceptance_length == pytest.approx(9 / 4)
    rates, accepted, eligible = per_position_acceptance([trace], 3)
    assert (accepted, eligible) == ([3, 1, 1], [4, 2, 1])
    assert rates == pytest.approx([0.75, 0.5, 1.0])


def test_teacher_forced_accuracy_and_full_eval(target, trained):
    prompts = eval_prompts()
    hooked = TargetRunner(target, LAYERS)
    ref = greedy_generate(TargetRunner(target), prompts[0], 20, set())
    correct, total = Eagle3Drafter(trained).teacher_forced_counts(hooked, prompts[0], ref, 3)
    assert total == [19, 19, 19]  # every step predicts new tokens 2..20 (from slots j places apart)
    assert correct[0] >= 0.8 * total[0]  # a prompt it was trained on
    rnd = Eagle3Drafter(tiny_draft(target, seed=7)).teacher_forced_counts(hooked, prompts[0], ref, 3)[0]
    assert sum(rnd) < sum(correct)

    res = run_speculative_eval(target, Eagle3Drafter(trained), prompts, num_draft_tokens=3, max_new_tokens=20, eos_ids=set())
    assert res["identical_outputs"] == len(prompts) == res["num_prompts"]
    assert res["new_tokens"] == 20 * len(prompts)
    assert res["acceptance_length"] == pytest.approx((res["new_tokens"] - len(prompts)) / res["verify_steps"])
    assert 1.0 < res["acceptance_length"] <= 4.0 and 1.0 < res["simulated_acceptance_length"] <= 4.0
    assert len(res["per_position_acceptance"]) == 3 and res["speedup"] > 0
    assert [p["new_tokens"] for p in res["per_prompt"]] == [20] * len(prompts)
