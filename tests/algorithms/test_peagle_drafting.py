"""P-EAGLE drafting in the speculative harness: exact greedy output (random and overfit drafts), k tokens per
draft forward, and decode-time proposals equal to the teacher-forced chains; export reloads bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.base import LoadOptions
from specforge_lightning.algorithms.peagle import PEagleConfig, PEagleDraft, PEagleDrafter
from specforge_lightning.algorithms.peagle.export import export_hf
from specforge_lightning.algorithms.peagle.sampling import all_chains, pack_elements
from specforge_lightning.algorithms.registry import get_algorithm
from specforge_lightning.evaluation.speculative import TargetRunner, greedy_generate, speculative_generate
from specforge_lightning.export.drafts import load_draft
from tests.algorithms.draft_fixtures import one_thread, seeded, target  # noqa: F401 (fixtures)
from tests.evaluation.test_speculative import LAYERS, VOCAB, eval_prompts, greedy_corpus, make_prompts

DEPTHS = 4


def make_draft(target, seed: int) -> PEagleDraft:
    config = PEagleConfig.from_target_config(target.config.to_dict(), VOCAB, LAYERS, mask_token_id=0,
                                             num_hidden_layers=2, num_depths=DEPTHS)
    draft = seeded(PEagleDraft, config, seed)
    draft.embed_tokens.weight.data.copy_(target.model.embed_tokens.weight.detach())
    return draft.eval()


def drafter_of(draft: PEagleDraft) -> PEagleDrafter:
    return get_algorithm("peagle").make_drafter(SimpleNamespace(draft=draft))


@pytest.fixture(scope="module")
def trained(target) -> PEagleDraft:
    """Overfit to the target's greedy continuations: every chain, hard CE on x_{a+d+2}."""
    draft = make_draft(target, seed=3)
    x, aux = greedy_corpus(target, make_prompts(4, 8, seed=10))
    B, L = x.shape
    docs = torch.zeros_like(x)
    elements = pack_elements([all_chains(docs[b], DEPTHS) for b in range(B)], docs)
    label_pos = elements.orig + 2
    scored = elements.valid & (label_pos < L)
    labels = x.gather(1, label_pos.clamp(max=L - 1))[scored]
    opt = torch.optim.Adam(draft.parameters(), lr=1e-2)
    draft.train()
    for _ in range(80):
        logits = draft.compute_logits(draft(x, aux, elements))[scored]
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval().requires_grad_(False)


def test_record_builds_the_parallel_drafter(target):
    drafter = drafter_of(make_draft(target, 0))
    assert type(drafter) is PEagleDrafter and drafter.layer_ids == LAYERS and drafter.num_positions == DEPTHS


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_output_identical_to_target_greedy(target, trained, kind, k):
    draft = make_draft(target, seed=7) if kind == "random" else trained
    drafter = drafter_of(draft)
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    calls: list[int] = []
    original = draft.decode
    draft.decode = lambda *a, **kw: calls.append(a[3]) or original(*a, **kw)  # MASK slots of each draft forward
    drafted: list[int] = []
    try:
        accepted = 0
        for prompt in eval_prompts():
            ref = greedy_generate(plain, prompt, 20, set())
            trace = speculative_generate(hooked, drafter, prompt, k, 20, set())
            assert trace.output_ids == ref
            assert all(d <= min(k, DEPTHS) for d in trace.drafted)
            accepted += sum(trace.matched)
            drafted += [d for d in trace.drafted if d > 0]
    finally:
        del draft.decode
    assert [m + 1 for m in calls] == drafted  # ONE draft forward per proposal, however many tokens it drafts
    if kind == "trained" and k > 1:
        assert accepted > 0  # the overfit draft gets multi-token verify steps


def test_proposals_equal_the_teacher_forced_chains(target, trained):
    drafter = drafter_of(trained)
    runner = TargetRunner(target, LAYERS)
    prompt = eval_prompts()[0]
    out = greedy_generate(TargetRunner(target), prompt, 12, set())
    for n_out in (1, 4, 9):  # the verified text ends n_out tokens into the output
        ids = list(prompt) + out[:n_out]
        runner.reset()
        _, aux = runner.forward(ids, keep_logits=1)
        drafter.start(aux[:-1], ids[1:])
        proposed = drafter.propose(DEPTHS)
        anchor, depth, pred = drafter.teacher_forced_predictions(ids, aux, DEPTHS)
        chain = pred[anchor == len(ids) - 2]
        assert proposed == chain[depth[anchor == len(ids) - 2].argsort()].tolist()


def test_simulated_counts_cover_the_output(target, trained):
    drafter = drafter_of(trained)
    prompt = eval_prompts()[0]
    out = greedy_generate(TargetRunner(target), prompt, 10, set())
    correct, total = drafter.teacher_forced_counts(TargetRunner(target, LAYERS), prompt, out, 6)
    assert total[:DEPTHS] == [len(out) - 1 - d for d in range(DEPTHS)] and total[DEPTHS:] == [0, 0]
    assert all(0 <= c <= t for c, t in zip(correct, total)) and correct[0] > 0


def test_hf_export_reloads_bit_for_bit(tmp_path, trained):
    folder = export_hf(trained, tmp_path / "hf", {"target_id": "tiny"})
    algorithm, loaded = load_draft(folder, LoadOptions())
    assert algorithm.name == "peagle" and loaded.kind == "hf" and loaded.has_embedding
    a, b = trained.state_dict(), loaded.draft.state_dict()
    assert a.keys() == b.keys() and "mask_hidden" in a and "embed_tokens.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
    assert loaded.layer_ids == LAYERS and loaded.draft.config == trained.config
