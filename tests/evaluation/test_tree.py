"""Tree drafting and verification: exact greedy output, the tree mask, the KV cache after acceptance."""

from __future__ import annotations

import pytest
import torch

from specforge_lightning.algorithms.base import TreeSpec
from specforge_lightning.algorithms.eagle3.drafter import Eagle3Drafter
from specforge_lightning.evaluation.runner import TargetRunner, greedy_generate
from specforge_lightning.evaluation.speculative import run_speculative_eval, speculative_generate
from tests.evaluation.test_speculative import LAYERS, eval_prompts, make_prompts, tiny_draft, tiny_target, train_draft

SPECS = [TreeSpec(3, 2, 4), TreeSpec(3, 2, 8), TreeSpec(4, 3, 10), TreeSpec(5, 4, 16)]
PARENTS = [-1, -1, 0, 0, 1, 2, 2, 4, -1]  # branches at the root and below, depths 1..4


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def trained(target):
    draft = tiny_draft(target, seed=2)
    train_draft(draft, target, make_prompts(4, 8, seed=10), steps=30)
    return draft


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"S{s.num_steps}K{s.topk}N{s.num_draft_tokens}")
def test_tree_output_identical_to_greedy(target, trained, spec):
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    for name, draft in (("random", tiny_draft(target, seed=7)), ("trained", trained)):
        drafter, traces = Eagle3Drafter(draft), []
        for prompt in eval_prompts():
            ref = greedy_generate(plain, prompt, 24, set())
            trace = speculative_generate(hooked, drafter, prompt, 0, 24, set(), tree=spec)
            assert trace.output_ids == ref, name
            assert max(trace.drafted) <= spec.num_draft_tokens - 1 and max(trace.depth) <= spec.num_steps
            traces.append(trace)
        if name == "trained":
            assert max(m for t in traces for m in t.matched) >= 2
            assert any(d > depth for t in traces for d, depth in zip(t.drafted, t.depth))  # real trees, not chains


def test_topk_one_tree_is_the_chain(target, trained):
    hooked = TargetRunner(target, LAYERS)
    for prompt in eval_prompts():
        chain = speculative_generate(hooked, Eagle3Drafter(trained), prompt, 4, 24, set())
        tree = speculative_generate(hooked, Eagle3Drafter(trained), prompt, 0, 24, set(), tree=TreeSpec(4))
        assert (tree.output_ids, tree.drafted, tree.matched) == (chain.output_ids, chain.drafted, chain.matched)


def _ancestry(i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = PARENTS[i]
    return path[::-1]


def test_tree_mask_matches_per_path_verification(target):
    prompt, root = make_prompts(1, 7, seed=5)[0], 11
    tokens = make_prompts(1, len(PARENTS), seed=6)[0]
    runner = TargetRunner(target, LAYERS)
    runner.reset()
    runner.forward(prompt, keep_logits=1)
    logits, aux = runner.forward_tree(root, tokens, PARENTS)
    assert logits.shape[0] == aux.shape[0] == len(PARENTS) + 1
    single = TargetRunner(target, LAYERS)
    for i in [-1, *range(len(PARENTS))]:
        path = _ancestry(i)
        single.reset()
        single.forward(prompt, keep_logits=1)
        ref_logits, ref_aux = single.forward_logits([root] + [tokens[j] for j in path])
        torch.testing.assert_close(logits[i + 1], ref_logits[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(aux[i + 1], ref_aux[-1], atol=1e-5, rtol=1e-5)


def test_kv_cache_after_acceptance_equals_one_by_one_decoding(target):
    prompt, root = make_prompts(1, 7, seed=5)[0], 11
    tokens = make_prompts(1, len(PARENTS), seed=6)[0]
    path = _ancestry(7)  # nodes 1 -> 4 -> 7
    runner = TargetRunner(target, LAYERS)
    runner.reset()
    runner.forward(prompt, keep_logits=1)
    past = runner.length
    runner.forward_tree(root, tokens, PARENTS)
    runner.keep(past, [0] + [j + 1 for j in path])
    ref = TargetRunner(target, LAYERS)
    ref.reset()
    ref.forward(prompt, keep_logits=1)
    for t in [root] + [tokens[j] for j in path]:
        ref.forward([t])
    assert runner.length == ref.length == len(prompt) + 1 + len(path)
    for a, b in zip(runner.cache.layers, ref.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.forward_logits([5, 9])[0], ref.forward_logits([5, 9])[0], atol=1e-5, rtol=1e-5)


def test_draft_tree_scores_equal_chain_drafting_of_each_path(target, trained):
    """The draft's own tree mask: every node's cumulative log-prob equals drafting its path as a chain."""
    prompt = eval_prompts()[0]
    runner = TargetRunner(target, LAYERS)
    runner.reset()
    first, aux = runner.forward(prompt, keep_logits=1)
    drafter = Eagle3Drafter(trained)
    drafter.start(aux, prompt[1:] + first[-1:])
    tree = drafter.propose_tree(TreeSpec(3, 3, 12))
    assert len(tree.tokens) == 11 and not tree.is_chain
    for i in range(len(tree.tokens)):
        path, j = [], i
        while j >= 0:
            path.append(tree.tokens[j])
            j = tree.parents[j]
        chain = Eagle3Drafter(trained)
        chain.start(aux, prompt[1:] + first[-1:])
        logits, hidden, score = chain._logits, chain._hidden, 0.0
        for d, tok in enumerate(reversed(path)):
            score += float(logits.float().log_softmax(-1)[tok])  # draft vocab = target vocab here (d2t = 0)
            ids = torch.tensor([[tok]])
            out, hidden, chain.cache = trained.draft_step(ids, hidden, torch.tensor([[chain.length + d]]), chain.cache)
            logits = out[0, -1]
        assert score == pytest.approx(tree.scores[i], abs=1e-4)


@pytest.mark.parametrize("spec", [TreeSpec(5, 1, 6, 0.5), TreeSpec(5, 4, 16, 0.2)], ids=["chain", "tree"])
def test_draft_threshold_never_changes_greedy_output(target, trained, spec):
    plain, hooked = TargetRunner(target), TargetRunner(target, LAYERS)
    full = TreeSpec(spec.num_steps, spec.topk, spec.num_draft_tokens)
    cut_drafted = full_drafted = 0
    for prompt in eval_prompts():
        ref = greedy_generate(plain, prompt, 24, set())
        cut = speculative_generate(hooked, Eagle3Drafter(trained), prompt, 0, 24, set(), tree=spec)
        whole = speculative_generate(hooked, Eagle3Drafter(trained), prompt, 0, 24, set(), tree=full)
        assert cut.output_ids == whole.output_ids == ref
        cut_drafted, full_drafted = cut_drafted + sum(cut.drafted), full_drafted + sum(whole.drafted)
    assert cut_drafted < full_drafted


def test_run_speculative_eval_reports_the_tree(target, trained):
    prompts = eval_prompts()[:3]
    spec = TreeSpec(4, 2, 8)
    res = run_speculative_eval(target, Eagle3Drafter(trained), prompts, max_new_tokens=16, eos_ids=set(), tree=spec,
                               warmup=False)
    assert res["identical_outputs"] == res["num_prompts"] == 3
    assert res["policy"] == {"kind": "tree", "num_steps": 4, "topk": 2, "num_draft_tokens": 8, "threshold": None}
    assert res["drafted_tokens"] == res["accepted_tokens"] + res["rejected_tokens"]
    assert res["accepted_tokens"] == res["new_tokens"] - 3 - res["verify_steps"]
    assert 1 < res["mean_verify_width"] <= 8 and 0 <= res["wasted_verify_fraction"] < 1
    assert sum(res["accept_length_histogram"]) == res["verify_steps"] and len(res["per_position_acceptance"]) == 4
