from collections import Counter

import pytest
import torch

from specforge_lightning.data.vocab import (
    build_vocab_mapping,
    count_supervised_tokens,
    coverage,
    load_vocab_mapping,
    save_vocab_mapping,
)


def test_most_frequent_supervised_tokens_form_the_draft_vocab():
    counts = count_supervised_tokens([([5, 7, 7, 9, 3], [1, 1, 1, 0, 1]), ([7, 3, 3], [1, 1, 1])])
    assert counts == Counter({7: 3, 3: 3, 5: 1})
    d2t, t2d = build_vocab_mapping(counts, vocab_size=12, draft_vocab_size=2)
    assert torch.nonzero(t2d).flatten().tolist() == [3, 7]
    assert (torch.arange(2) + d2t).tolist() == [3, 7]


def test_pads_with_zero_count_ids_when_corpus_is_small():
    d2t, t2d = build_vocab_mapping(Counter({9: 4}), vocab_size=16, draft_vocab_size=4)
    assert torch.nonzero(t2d).flatten().tolist() == [0, 1, 2, 9]
    assert int(t2d.sum()) == 4


def test_round_trip_and_consistency_check(tmp_path):
    d2t, t2d = build_vocab_mapping(Counter({4: 2, 1: 1}), vocab_size=8, draft_vocab_size=3)
    path = tmp_path / "vocab.safetensors"
    save_vocab_mapping(path, d2t, t2d)
    d2t2, t2d2 = load_vocab_mapping(path)
    assert torch.equal(d2t, d2t2) and torch.equal(t2d, t2d2)
    save_vocab_mapping(path, d2t + 1, t2d)
    with pytest.raises(ValueError, match="disagree"):
        load_vocab_mapping(path)


def test_coverage_and_oversized_draft_vocab():
    counts = Counter({1: 3, 2: 1})
    _, t2d = build_vocab_mapping(counts, vocab_size=4, draft_vocab_size=1)
    assert coverage(counts, t2d) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="exceeds"):
        build_vocab_mapping(counts, vocab_size=4, draft_vocab_size=5)
