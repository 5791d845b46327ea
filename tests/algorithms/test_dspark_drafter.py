"""DSpark drafting in the speculative harness: the target's greedy output exactly, Markov decoding equal to the
teacher-forced block, and confidence scheduling that proposes fewer tokens without changing the output."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

from specforge_lightning.algorithms.dflash import DFlashConfig, block_labels
from specforge_lightning.algorithms.dspark import DSparkBlockDrafter, DSparkConfig, DSparkDraft, dspark_loss
from specforge_lightning.algorithms.registry import get_algorithm
from specforge_lightning.evaluation.speculative import TargetRunner, greedy_generate, speculative_generate
from tests.algorithms.draft_fixtures import one_thread, seeded, target, with_target_head  # noqa: F401 (fixtures)
from tests.evaluation.test_speculative import eval_prompts, greedy_corpus, make_prompts

LAYERS = (1, 2, 3)
BS = 4  # DSpark scores every slot: up to 4 tokens per block
KINDS = ("vanilla", "gated", "rnn")


def make_draft(target, kind: str, seed: int) -> DSparkDraft:
    base = DFlashConfig.from_target_config(target.config.to_dict(), LAYERS, 0, block_size=BS).to_dict()
    config = DSparkConfig(**base, markov_rank=16, markov_head_type=kind)
    return with_target_head(seeded(DSparkDraft, config, seed), target)


def train(draft: DSparkDraft, target, prompts: Sequence[Sequence[int]], steps: int) -> None:
    """Overfit on the target's greedy continuations with the full DSpark loss (every position an anchor)."""
    x, aux = greedy_corpus(target, prompts)
    with torch.no_grad():
        last = target.model(input_ids=x).last_hidden_state
    B, L = x.shape
    anchors = torch.arange(L - 1).expand(B, -1)
    keep = torch.ones_like(anchors, dtype=torch.bool)
    labels, w = block_labels(x, torch.ones_like(x), anchors, keep, BS, shift=1)
    pos = (anchors[..., None] + torch.arange(BS)).clamp(max=L - 1)
    prev = x.gather(1, pos.reshape(B, -1)).view(pos.shape)
    teacher = last.gather(1, pos.reshape(B, -1, 1).expand(-1, -1, last.shape[-1])).view(*pos.shape, -1)
    opt = torch.optim.Adam(draft.parameters(), lr=1e-2)
    draft.train()
    for _ in range(steps):
        out = dspark_loss(draft, draft(x, aux, anchors, keep), labels, w, keep, prev, teacher, 0.5, 0.5, 1.0, 4.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    draft.eval()


@pytest.fixture(scope="module")
def trained(target) -> dict[str, DSparkDraft]:
    out = {}
    for kind in KINDS:
        draft = make_draft(target, kind, seed=2)
        train(draft, target, make_prompts(4, 8, seed=10), steps=60)
        out[kind] = draft
    return out


def decode_all(target, drafter, k: int, max_new: int = 30):
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    refs, traces = [], []
    for prompt in eval_prompts():
        refs.append(greedy_generate(plain, prompt, max_new, set()))
        traces.append(speculative_generate(hooked, drafter, prompt, k, max_new, set()))
    return refs, traces


def summary(traces) -> dict[str, float]:
    steps = sum(t.verify_steps for t in traces)
    drafted = sum(sum(t.drafted) for t in traces)
    matched = sum(sum(t.matched) for t in traces)
    return {"AL": sum(sum(t.emitted) for t in traces) / steps, "tokens_per_verify": drafted / steps,
            "drafted_rejected": drafted - matched, "verify_steps": steps, "drafted": drafted}


def test_registry_builds_the_dspark_drafter(target):
    draft = make_draft(target, "vanilla", 0)
    drafter = get_algorithm("dspark").make_drafter(SimpleNamespace(draft=draft))
    assert type(drafter) is DSparkBlockDrafter and drafter.num_positions == BS and drafter.layer_ids == LAYERS
    assert drafter.confidence_threshold is None  # the documented default: whole blocks, as upstream


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_random_draft_output_identical_to_greedy(target, kind, k):
    drafter = DSparkBlockDrafter(make_draft(target, kind, seed=7))
    refs, traces = decode_all(target, drafter, k, 20)
    for ref, trace in zip(refs, traces):
        assert trace.output_ids == ref
        assert all(d <= min(k, BS) for d in trace.drafted)


@pytest.mark.parametrize("kind", KINDS)
def test_trained_draft_exact_multi_token_and_equal_to_teacher_forced(target, trained, kind):
    drafter = DSparkBlockDrafter(trained[kind])
    k = BS
    refs, traces = decode_all(target, drafter, k)
    hooked = TargetRunner(target, LAYERS)
    for prompt, ref, trace in zip(eval_prompts(), refs, traces):
        assert trace.output_ids == ref
        hit, _ = drafter.teacher_forced_hits(hooked, prompt, ref, k)
        anchor = 0
        for drafted, matched, emitted in zip(trace.drafted, trace.matched, trace.emitted):
            lead = int(torch.cumprod(hit[anchor, :drafted].long(), 0).sum())
            assert matched == min(lead, drafted)  # decode-time Markov tokens = the teacher-forced block's
            anchor += emitted
    assert max(m for t in traces for m in t.matched) == BS
    assert summary(traces[:2])["AL"] > 1.5  # the prompts it was trained on


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("drafted", ["random", "trained"])
def test_confidence_scheduling_proposes_fewer_tokens_and_never_changes_the_output(target, trained, kind, drafted):
    draft = trained[kind] if drafted == "trained" else make_draft(target, kind, seed=7)
    fixed_refs, fixed = decode_all(target, DSparkBlockDrafter(draft), BS)
    scheduled = DSparkBlockDrafter(draft, confidence_threshold=0.3)
    refs, traces = decode_all(target, scheduled, BS)
    assert [t.output_ids for t in traces] == refs == fixed_refs == [t.output_ids for t in fixed]
    a, b = summary(fixed), summary(traces)
    print(f"\n{kind} {drafted}: fixed {a}\n{kind} {drafted}: scheduled(0.3) {b}")
    assert b["tokens_per_verify"] < a["tokens_per_verify"] and scheduled.stopped_early > 0
    assert all(d >= 1 for t in traces for d in t.drafted[:-1])  # min_draft_tokens = 1 (the last step is capped)
    assert b["drafted_rejected"] <= a["drafted_rejected"]


def test_scheduling_knobs_are_checked(target):
    plain = make_draft(target, "vanilla", 0)
    with pytest.raises(ValueError, match="confidence_threshold"):
        DSparkBlockDrafter(plain, confidence_threshold=1.5)
    no_head = DSparkDraft(DSparkConfig(**{**plain.config.to_dict(), "enable_confidence_head": False}))
    with pytest.raises(ValueError, match="confidence head"):
        DSparkBlockDrafter(no_head, confidence_threshold=0.5)
    assert "confidence-scheduled" in DSparkBlockDrafter(plain, confidence_threshold=0.5).description
