"""The planted copy head: it copies what followed an earlier occurrence, and touches nothing else."""

from __future__ import annotations

import pytest
import torch

from specforge_lightning.algorithms.layers import rope_inv_freq
from specforge_lightning.algorithms.eagle3.copy_head import (
    content_pairs,
    fit_token_readout,
    next_slowest_pairs,
    plant_copy_head,
)
from specforge_lightning.algorithms.eagle3.model import Eagle3Draft
from tests.algorithms.eagle3_fixtures import tied_draft

V, H, HD = 96, 64, 32


def make_draft(seed: int = 0) -> tuple[Eagle3Draft, torch.Tensor]:
    """A draft whose lm_head and norm come from a tied 'target' embedding, plus the aux mixing matrix."""
    return tied_draft(V, H, HD, seed), torch.randn(H, H) / H**0.5


def aux_of(
    ids: torch.Tensor, emb: torch.Tensor, mix: torch.Tensor, seed: int, prev_mix: torch.Tensor | None = None
) -> torch.Tensor:
    """Captured states: the low layer encodes the current token (linearly, small), the others are loud
    noise; with ``prev_mix`` the middle layer encodes the previous token instead (noisier)."""
    g = torch.Generator().manual_seed(seed)
    low = emb[ids] @ mix + 0.05 * torch.randn(len(ids), H, generator=g)
    loud = 25 * torch.randn(len(ids), 2 * H, generator=g)
    if prev_mix is not None:
        prev = torch.cat([torch.zeros(1, H), emb[ids[:-1]]]) @ prev_mix
        loud[:, :H] = 10 * prev + 5 * torch.randn(len(ids), H, generator=g)
    return torch.cat([low, loud], -1)


def training_samples(
    draft: Eagle3Draft, mix: torch.Tensor, n: int = 48, length: int = 80, prev_mix: torch.Tensor | None = None
):
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, V, (length,), generator=g) for _ in range(n)]
    return ids, [aux_of(x, draft.embed_tokens.weight, mix, seed=i, prev_mix=prev_mix) for i, x in enumerate(ids)]


def looping_accuracy(draft: Eagle3Draft, mix: torch.Tensor, steps: int = 3) -> list[float]:
    """Per TTT step, the accuracy on a 12-token loop repeated 4 times, at slots whose next token appeared before."""
    g = torch.Generator().manual_seed(7)
    loop = torch.randperm(V, generator=g)[:12]
    ids = loop.repeat(4)
    aux = aux_of(ids, draft.embed_tokens.weight, mix, seed=99)
    with torch.no_grad():
        outputs = draft.ttt_forward(ids[None], aux[None], length=steps)
    slots = torch.arange(12, len(ids) - 1 - steps)  # step k at slot t predicts ids[t + 2 + k]
    return [
        float((draft.to_target_ids(logits[0].argmax(-1))[slots] == ids[slots + 2 + k]).float().mean())
        for k, (logits, _) in enumerate(outputs)
    ]


def test_planted_draft_copies_a_loop_an_untrained_one_does_not():
    draft, mix = make_draft()
    before = looping_accuracy(draft, mix)
    report = plant_copy_head(draft, *training_samples(draft, mix), max_position=64)
    after = looping_accuracy(draft, mix)
    assert max(before) < 0.1
    assert min(after) > 0.8, (before, after, report)
    assert report["key_token_accuracy"] > 0.9


def test_unwrite_keeps_chain_steps_copying():
    """Step k >= 1 gets step k-1's output, which still holds the token it copied; unwriting removes it."""
    kept, mix = make_draft()
    plant_copy_head(kept, *training_samples(kept, mix), max_position=64, unwrite=0.0)
    removed, _ = make_draft()
    plant_copy_head(removed, *training_samples(removed, mix), max_position=64, unwrite=1.0)
    kept_acc, removed_acc = looping_accuracy(kept, mix), looping_accuracy(removed, mix)
    assert removed_acc[2] > kept_acc[2] + 0.2, (kept_acc, removed_acc)


def ambiguous_loop_accuracy(draft: Eagle3Draft, mix: torch.Tensor, prev_mix: torch.Tensor) -> float:
    """A 12-token loop where one token occurs twice with different successors: step-0 accuracy on
    the token after it (one-token matching can only guess which occurrence is meant)."""
    g = torch.Generator().manual_seed(7)
    loop = torch.randperm(V, generator=g)[:12]
    loop[6] = loop[2]
    ids = loop.repeat(4)
    aux = aux_of(ids, draft.embed_tokens.weight, mix, seed=99, prev_mix=prev_mix)
    with torch.no_grad():
        logits, _ = draft.ttt_forward(ids[None], aux[None], length=1)[0]
    slots = torch.tensor([t for t in range(12, len(ids) - 2) if ids[t + 1] == loop[2]])
    return float((draft.to_target_ids(logits[0].argmax(-1))[slots] == ids[slots + 2]).float().mean())


def planted_with_previous(**kwargs) -> tuple[Eagle3Draft, torch.Tensor, torch.Tensor, dict[str, float]]:
    draft, mix = make_draft()
    prev_mix = torch.randn(H, H, generator=torch.Generator().manual_seed(3)) / H**0.5
    report = plant_copy_head(draft, *training_samples(draft, mix, prev_mix=prev_mix), max_position=64, **kwargs)
    return draft, mix, prev_mix, report


def test_previous_token_match_tells_apart_two_occurrences():
    one, mix, prev_mix, _ = planted_with_previous()
    two, _, _, report = planted_with_previous(previous=1.0)
    one_acc, two_acc = ambiguous_loop_accuracy(one, mix, prev_mix), ambiguous_loop_accuracy(two, mix, prev_mix)
    assert one_acc <= 0.75 and two_acc == 1.0, (one_acc, two_acc, report)
    assert report["previous_token_accuracy"] > 0.9 and 0 < report["previous_dims"] <= report["content_dims"]


def test_only_the_planted_head_and_fc_change():
    draft, mix = make_draft()
    old = {k: v.clone() for k, v in draft.state_dict().items()}
    plant_copy_head(draft, *training_samples(draft, mix), kv_head=1, unwrite=0.0)
    new = draft.state_dict()
    g = draft.config.num_attention_heads // draft.config.num_key_value_heads
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed == {
        "fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
        "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    }
    attn = "midlayer.self_attn."
    assert torch.equal(old[attn + "q_proj.weight"][: g * HD], new[attn + "q_proj.weight"][: g * HD])
    for proj in ("k_proj", "v_proj"):
        assert torch.equal(old[attn + proj + ".weight"][:HD], new[attn + proj + ".weight"][:HD])
    assert torch.equal(old[attn + "o_proj.weight"][:, : g * HD], new[attn + "o_proj.weight"][:, : g * HD])
    # The planted key reads the hidden half only; query and (without unwrite) value the embedding half only.
    assert not new[attn + "k_proj.weight"][HD:, :H].any()
    assert not new[attn + "q_proj.weight"][g * HD :, H:].any()
    assert not new[attn + "v_proj.weight"][HD:, H:].any()


def test_content_pairs_are_the_slow_rope_pairs():
    smollm = content_pairs(64, rope_inv_freq(64, 100000.0), 512)
    assert smollm == list(range(20, 32))  # turn by <= 0.5 rad over 512 positions
    tiny = content_pairs(HD, rope_inv_freq(HD, 10000.0), 512)
    assert tiny == [12, 13, 14, 15]  # only 3 slow pairs: the head_dim // 8 slowest instead
    # The previous-token match takes the next-slowest pairs that turn < 90 degrees over 32 tokens.
    assert next_slowest_pairs(rope_inv_freq(64, 100000.0), smollm, len(smollm)) == list(range(9, 20))


def test_token_readout_recovers_a_linear_code():
    g = torch.Generator().manual_seed(0)
    aux = torch.randn(500, 12, generator=g) * torch.tensor([1.0] * 4 + [50.0] * 8)
    w = torch.randn(12, 3, generator=g)
    full, partial = fit_token_readout(aux, aux @ w, ridge=1e-8, held_out=50)
    torch.testing.assert_close(full, w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(partial, w, atol=1e-3, rtol=1e-3)


def test_bad_inputs_are_refused():
    draft, mix = make_draft()
    ids, aux = training_samples(draft, mix, n=2, length=20)
    with pytest.raises(ValueError, match="at least 256 sample tokens"):
        plant_copy_head(draft, ids, aux)
    ids, aux = training_samples(draft, mix)
    with pytest.raises(ValueError, match="kv_head 2 outside"):
        plant_copy_head(draft, ids, aux, kv_head=2)
    with pytest.raises(ValueError, match="width 64"):
        plant_copy_head(draft, ids, [a[:, :H] for a in aux])
