"""Block drafting (DFlash, Domino) in the speculative harness: exact greedy output, multi-token acceptance,
decode-time proposals equal to the teacher-forced blocks, and the simulated AL equal to the block metric."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

from specforge_lightning.algorithms.dflash import DFlashConfig, DFlashDraft, block_labels, dflash_loss
from specforge_lightning.algorithms.dflash.drafter import BLOCK_SIMULATED_DEFINITION, BlockDrafter
from specforge_lightning.algorithms.domino import DominoConfig, DominoDraft, domino_loss
from specforge_lightning.algorithms.domino.drafter import DominoBlockDrafter
from specforge_lightning.evaluation.speculative import (
    TargetRunner,
    greedy_generate,
    run_speculative_eval,
    speculative_generate,
)
from specforge_lightning.algorithms.registry import get_algorithm
from tests.algorithms.draft_fixtures import one_thread, seeded, target, with_target_head  # noqa: F401 (fixtures)
from tests.evaluation.test_speculative import eval_prompts, greedy_corpus, make_prompts


def make_drafter(draft: DFlashDraft):
    """The drafter the registry's record builds for this draft (what ``evaluate`` uses)."""
    name = "domino" if isinstance(draft, DominoDraft) else "dflash"
    return get_algorithm(name).make_drafter(SimpleNamespace(draft=draft))

LAYERS = (1, 2, 3)
BS = 4  # block size: DFlash proposes at most 3 tokens, Domino (shifted labels) 4
MASK = 0


def make_draft(target, kind: str, seed: int) -> DFlashDraft:
    cfg = target.config.to_dict()
    if kind == "dflash":
        config = DFlashConfig.from_target_config(cfg, LAYERS, MASK, block_size=BS)
        cls = DFlashDraft
    else:
        base = DFlashConfig.from_target_config(cfg, LAYERS, MASK, block_size=BS).to_dict()
        config, cls = DominoConfig(**base, emb_dim=32, gru_hidden_dim=32), DominoDraft
    return with_target_head(seeded(cls, config, seed), target)


def train_blocks(draft: DFlashDraft, target, prompts: Sequence[Sequence[int]], steps: int) -> None:
    """Overfit the draft to the target's greedy continuations: every position an anchor, CE over the block."""
    x, aux = greedy_corpus(target, prompts)
    B, L = x.shape
    anchors = torch.arange(L - 1).expand(B, -1)
    keep = torch.ones_like(anchors, dtype=torch.bool)
    domino = isinstance(draft, DominoDraft)
    shift = 1 if domino else 0
    labels, w = block_labels(x, torch.ones_like(x), anchors, keep, BS, shift=shift)
    opt = torch.optim.Adam(draft.parameters(), lr=1e-2)
    draft.train()
    for _ in range(steps):
        hidden = draft(x, aux, anchors, keep)
        if domino:
            prev_pos = (anchors[..., None] + torch.arange(BS)).clamp(max=L - 1)
            prev = x.gather(1, prev_pos.reshape(B, -1)).view(prev_pos.shape)
            gru, _ = draft.gru_states(prev)
            loss = domino_loss(hidden, gru, labels, w, keep, draft.base_and_final_logits, lam=0.5).loss
        else:
            loss = dflash_loss(hidden[:, :, 1:], labels, w, keep, draft.logits).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    draft.eval()


@pytest.fixture(scope="module")
def trained(target) -> dict[str, DFlashDraft]:
    out = {}
    for kind in ("dflash", "domino"):
        draft = make_draft(target, kind, seed=2)
        train_blocks(draft, target, make_prompts(4, 8, seed=10), steps=60)  # imperfect: partial acceptances too
        out[kind] = draft
    return out


def leading(hits: torch.Tensor) -> int:
    return int(torch.cumprod(hits.long(), 0).sum())


def test_make_drafter_picks_the_block_drafter(target):
    dflash, domino = make_draft(target, "dflash", 0), make_draft(target, "domino", 0)
    assert type(make_drafter(dflash)) is BlockDrafter and type(make_drafter(domino)) is DominoBlockDrafter
    assert make_drafter(dflash).num_positions == BS - 1 and make_drafter(domino).num_positions == BS
    assert make_drafter(dflash).layer_ids == LAYERS == dflash.config.aux_layer_ids


@pytest.mark.parametrize("kind", ["dflash", "domino"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_random_block_draft_output_identical_to_greedy(target, kind, k):
    drafter = make_drafter(make_draft(target, kind, seed=7))
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    for prompt in eval_prompts():
        ref = greedy_generate(plain, prompt, 20, set())
        trace = speculative_generate(hooked, drafter, prompt, k, 20, set())
        assert trace.output_ids == ref
        assert all(d <= min(k, drafter.num_positions) for d in trace.drafted)  # a block caps the proposal
        assert sum(trace.emitted) == len(ref) - 1


@pytest.mark.parametrize("kind", ["dflash", "domino"])
@pytest.mark.parametrize("k", [2, 4])
def test_trained_block_draft_exact_with_multi_token_acceptance(target, trained, kind, k):
    drafter = make_drafter(trained[kind])  # one drafter reused across prompts, as the evaluator does
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    cap = min(k, drafter.num_positions)
    traces = []
    for prompt in eval_prompts():
        ref = greedy_generate(plain, prompt, 30, set())
        trace = speculative_generate(hooked, drafter, prompt, k, 30, set())
        assert trace.output_ids == ref
        traces.append(trace)
        # Each verify step proposed exactly the block a teacher-forced forward predicts at that anchor.
        hit, _ = drafter.teacher_forced_hits(hooked, prompt, ref, k)
        anchor = 0  # index of the anchor among the new tokens
        for drafted, matched, emitted in zip(trace.drafted, trace.matched, trace.emitted):
            assert matched == min(leading(hit[anchor, :drafted]), drafted)
            anchor += emitted
    matched = [m for t in traces for m in t.matched]
    assert max(matched) == cap  # whole blocks accepted
    partial = [(m, d) for t in traces for m, d in zip(t.matched, t.drafted) if 0 < m < d]
    assert partial, "expected steps that accept some drafted tokens and reject the rest"
    seen = traces[:2]  # prompts the draft was trained on
    assert sum(t.verify_steps for t in seen) < 0.6 * sum(len(t.output_ids) - 1 for t in seen)


def test_teacher_forced_counts_are_conditional(target, trained):
    drafter = make_drafter(trained["dflash"])
    hooked = TargetRunner(target, LAYERS)
    prompt = eval_prompts()[0]
    ref = greedy_generate(TargetRunner(target), prompt, 30, set())
    k = 5
    correct, total = drafter.teacher_forced_counts(hooked, prompt, ref, k)
    hit, valid = drafter.teacher_forced_hits(hooked, prompt, ref, k)
    assert hit.shape == (len(ref) - 1, BS - 1) and len(correct) == len(total) == k
    assert total[0] == len(ref) - 1 and correct[0] == int(hit[:, 0].sum())
    assert total[1] == correct[0] - int(hit[-1, 0])  # the last anchor has no second position inside the text
    assert correct[BS - 1 :] == total[BS - 1 :] == [0] * (k - BS + 1)  # past the block: nothing drafted
    assert all(c <= t for c, t in zip(correct, total))


def test_run_speculative_eval_with_block_drafter(target, trained):
    draft = trained["dflash"]
    prompts = eval_prompts()[:3]
    k = 3
    res = run_speculative_eval(target, make_drafter(draft), prompts, num_draft_tokens=k, max_new_tokens=16, eos_ids=set(),
                               warmup=False)
    assert res["identical_outputs"] == 3 and res["acceptance_length"] > 1.2
    assert res["simulated_acceptance_length_definition"] == BLOCK_SIMULATED_DEFINITION
    # With conditional accuracies, 1 + Σ_k Π acc_j is the mean over anchors of 1 + leading correct (capped at k).
    drafter, hooked = make_drafter(draft), TargetRunner(target, LAYERS)
    leads = []
    for p, row in zip(prompts, res["per_prompt"]):
        hit, valid = drafter.teacher_forced_hits(hooked, p, row["output_ids"], k)
        ok = torch.cumprod((hit | ~valid).long(), 1) * valid  # an anchor's run may end at the text's end
        leads += [1 + int(r.sum()) for r in ok]
    acc = res["teacher_forced_accuracy"]
    assert len(acc) == k and res["per_position_acceptance"][0] is not None
    # Exact when every anchor has all k positions inside the text; the tail anchors make a small difference.
    assert res["simulated_acceptance_length"] == pytest.approx(sum(leads) / len(leads), abs=0.15)
