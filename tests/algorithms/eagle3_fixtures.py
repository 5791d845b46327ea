"""A small EAGLE3 draft whose lm_head and norm come from a tied random 'target' embedding (planted-head tests)."""

from __future__ import annotations

import torch

from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft


def tied_draft(vocab: int, hidden: int = 64, head_dim: int = 32, seed: int = 0) -> Eagle3Draft:
    """4 query heads over 2 key/value heads; draft vocab == target vocab; the torch RNG is seeded with ``seed``."""
    torch.manual_seed(seed)
    cfg = Eagle3Config(
        hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
        head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=512,
        vocab_size=vocab, draft_vocab_size=vocab, target_hidden_size=hidden, aux_layer_ids=(1, 2, 3),
    )
    draft = Eagle3Draft(cfg)
    emb = torch.randn(vocab, hidden)
    draft.embed_tokens.weight = emb
    draft.init_from_target(
        {"embed_tokens.weight": emb, "norm.weight": torch.ones(hidden)}, {"tie_word_embeddings": True},
        lm_head=True, norm=True, fc=False, midlayer=False,
    )
    return draft
