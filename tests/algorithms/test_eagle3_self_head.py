"""The planted current-token head: it hands the drafted-from token to the residual stream as a bigram guess."""

from __future__ import annotations

import pytest
import torch

from specforge_lightning.algorithms.eagle3.model import Eagle3Draft
from specforge_lightning.algorithms.eagle3.self_head import plant_self_head
from tests.algorithms.eagle3_fixtures import tied_draft

V, H, HD = 32, 64, 32


def make_draft() -> Eagle3Draft:
    """A tied draft with V < H: the tokens' embeddings are linearly independent."""
    return tied_draft(V, H, HD)


SUCCESSOR = torch.randperm(V, generator=torch.Generator().manual_seed(3))


def chain(start: int, length: int) -> torch.Tensor:
    """A text whose next token is always SUCCESSOR[current]: a pure bigram language."""
    ids = [start]
    for _ in range(length - 1):
        ids.append(int(SUCCESSOR[ids[-1]]))
    return torch.tensor(ids)


def sample(draft: Eagle3Draft, start: int, length: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """Aux states are loud noise (they know nothing); the target's final state at t is the embedding
    of its next token, so the tied head predicts the bigram successor."""
    g = torch.Generator().manual_seed(seed)
    ids = chain(start, length)
    emb = draft.embed_tokens.weight
    return {
        "input_ids": ids,
        "aux_hidden_states": 20 * torch.randn(length, 3 * H, generator=g),
        "last_hidden_state": emb[SUCCESSOR[ids]] / emb[SUCCESSOR[ids]].pow(2).mean(-1, keepdim=True).sqrt(),
        "loss_mask": torch.ones(length, dtype=torch.long),
    }


def accuracy(draft: Eagle3Draft, steps: int = 2) -> list[float]:
    """Per TTT step k: how often slot t predicts x_{t+2+k} on held-out texts."""
    hits = [0.0] * steps
    texts = [sample(draft, start, seed=100 + start) for start in range(0, V, 4)]
    for x in texts:
        ids = x["input_ids"]
        with torch.no_grad():
            outputs = draft.ttt_forward(ids[None], x["aux_hidden_states"][None], length=steps)
        slots = torch.arange(len(ids) - 2 - steps)
        for k, (logits, _) in enumerate(outputs):
            pred = draft.to_target_ids(logits[0].argmax(-1))[slots]
            hits[k] += float((pred == ids[slots + 2 + k]).float().mean()) / len(texts)
    return hits


def test_planted_head_predicts_the_bigram_successor():
    draft = make_draft()
    before = accuracy(draft)
    train = [sample(draft, start, seed=start) for start in range(V)]
    report = plant_self_head(draft, *([s[k] for s in train] for k in ("input_ids", "aux_hidden_states",
                                                                       "last_hidden_state", "loss_mask")))
    after = accuracy(draft)
    assert max(before) < 0.2
    assert report["bigram_accuracy"] > 0.95  # the regression itself recovers the successor
    assert after[0] > 0.9
    # A chain step reads its own input token too; its previous step's guess stays in the residual.
    assert after[1] > 0.5
    assert report["value_dims"] == HD


def test_only_the_planted_head_changes():
    draft = make_draft()
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    train = [sample(draft, start, seed=start) for start in range(V)]
    plant_self_head(draft, *([s[k] for s in train] for k in ("input_ids", "aux_hidden_states",
                                                              "last_hidden_state", "loss_mask")), kv_head=1)
    after = draft.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"}
    g = 2  # query heads per key/value head
    q = after["midlayer.self_attn.q_proj.weight"]
    assert torch.equal(q[: g * HD], before["midlayer.self_attn.q_proj.weight"][: g * HD])  # group 0 untouched
    assert torch.equal(q[(g + 1) * HD :], before["midlayer.self_attn.q_proj.weight"][(g + 1) * HD :])
    k = after["midlayer.self_attn.k_proj.weight"]
    assert torch.equal(k[:HD], before["midlayer.self_attn.k_proj.weight"][:HD])
    assert not k[HD:, H:].any()  # the key reads the embedding half only


def test_bad_kv_head_and_too_few_tokens_are_refused():
    draft = make_draft()
    train = [sample(draft, 0, length=40)]
    columns = [[s[k] for s in train] for k in ("input_ids", "aux_hidden_states", "last_hidden_state", "loss_mask")]
    with pytest.raises(ValueError, match="outside the draft's 2 key/value heads"):
        plant_self_head(draft, *columns, kv_head=2)
    with pytest.raises(ValueError, match="at least 256 supervised sample tokens"):
        plant_self_head(draft, *columns)
