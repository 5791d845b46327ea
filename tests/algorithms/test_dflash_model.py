"""DFlash draft: the block mask against a naive construction, factored attention against dense attention."""

from __future__ import annotations

import pytest
import torch

from specforge_lightning.algorithms.layers import apply_rope, rope_cos_sin, rope_inv_freq
from specforge_lightning.algorithms.dflash.model import (
    DFlashConfig,
    DFlashDraft,
    block_attention_mask,
    block_positions,
)

H, V, BS = 32, 40, 4


def _config(qk_norm: bool = True, layers: int = 2) -> DFlashConfig:
    return DFlashConfig(
        hidden_size=H, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128, vocab_size=V,
        target_layer_ids=(1, 3), mask_token_id=V - 1, num_hidden_layers=layers, block_size=BS, qk_norm=qk_norm,
    )


def _naive_mask(anchors, keep, S, bs):
    B, N = anchors.shape
    m = torch.zeros(B, N * bs, S + N * bs, dtype=torch.bool)
    for b in range(B):
        for n in range(N):
            for j in range(bs):
                q = n * bs + j
                for s in range(S):
                    m[b, q, s] = bool(keep[b, n]) and s < int(anchors[b, n])
                for n2 in range(N):
                    for j2 in range(bs):
                        m[b, q, S + n2 * bs + j2] = n2 == n
    return m


def test_block_mask_matches_naive_construction():
    anchors = torch.tensor([[0, 3, 7], [2, 5, 0]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    got = block_attention_mask(anchors, keep, 10, BS)
    assert torch.equal(got, _naive_mask(anchors, keep, 10, BS))
    assert got.any(-1).all()  # no query row is empty, even for a padded block or anchor 0


def _naive_layer_attention(attn, x, ctx, anchors, keep):
    """Dense attention of one DFlashAttention over keys [context ; all block slots] with the naive mask."""
    B, N, bs, _ = x.shape
    S = ctx.shape[1]
    c = attn
    xf = x.reshape(B, N * bs, -1)
    pos = torch.cat([torch.arange(S).expand(B, S), block_positions(anchors, bs).reshape(B, -1)], dim=1)
    inv = rope_inv_freq(c.head_dim, 10000.0)
    cos, sin = rope_cos_sin(pos, inv, x.dtype)
    kv_in = torch.cat([ctx, xf], dim=1)
    q = c.q_proj(xf).view(B, N * bs, c.n_heads, c.head_dim)
    k = c.k_proj(kv_in).view(B, S + N * bs, c.n_kv, c.head_dim)
    v = c.v_proj(kv_in).view(B, S + N * bs, c.n_kv, c.head_dim)
    if c.q_norm is not None:
        q, k = c.q_norm(q), c.k_norm(k)
    q = apply_rope(q.transpose(1, 2), cos[:, None, S:], sin[:, None, S:])
    k = apply_rope(k.transpose(1, 2), cos[:, None], sin[:, None])
    v = v.transpose(1, 2)
    g = c.n_heads // c.n_kv
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = _naive_mask(anchors, keep, S, bs)
    scores = (q @ k.transpose(-1, -2)) / c.head_dim**0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = scores.softmax(-1) @ v
    return c.o_proj(out.transpose(1, 2).reshape(B, N * bs, -1)).view(B, N, bs, -1)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_factored_attention_equals_dense_masked_attention(qk_norm):
    torch.manual_seed(0)
    draft = DFlashDraft(_config(qk_norm)).double()
    attn = draft.layers[0].self_attn
    B, S, N = 2, 9, 3
    anchors = torch.tensor([[0, 2, 6], [1, 4, 0]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    x = torch.randn(B, N, BS, H, dtype=torch.float64)
    ctx = torch.randn(B, S, H, dtype=torch.float64)
    inv = rope_inv_freq(8, 10000.0)
    rope_blk = rope_cos_sin(block_positions(anchors, BS), inv, torch.float64)
    rope_ctx = rope_cos_sin(torch.arange(S).expand(B, S), inv, torch.float64)
    allowed = (torch.arange(S)[None, None] < anchors[..., None]) & keep[..., None]
    got = attn(x, ctx, rope_blk, rope_ctx, allowed)
    want = _naive_layer_attention(attn, x, ctx, anchors, keep)
    torch.testing.assert_close(got, want)


def test_forward_uses_frozen_target_weights_and_blocks_do_not_see_their_future():
    torch.manual_seed(0)
    draft = DFlashDraft(_config())
    emb, head = torch.randn(V, H), torch.randn(V, H)
    draft.set_target_weights(emb, head)
    assert "embed_tokens.weight" not in draft.state_dict() and "lm_head.weight" not in draft.state_dict()
    assert all("embed" not in n and "lm_head" not in n for n, _ in draft.named_parameters())
    B, S = 1, 12
    ids = torch.randint(0, V - 1, (B, S))
    aux = torch.randn(B, S, 2 * H)
    anchors, keep = torch.tensor([[3, 7]]), torch.tensor([[True, True]])
    blocks = draft.block_ids(ids, anchors)
    assert torch.equal(blocks[0, :, 0], ids[0, anchors[0]]) and (blocks[..., 1:] == V - 1).all()
    out = draft(ids, aux, anchors, keep)
    assert out.shape == (B, 2, BS, H)
    # Changing the context at or after an anchor (and every later token) leaves that block unchanged.
    aux2, ids2 = aux.clone(), ids.clone()
    aux2[:, 7:] = torch.randn(B, S - 7, 2 * H)
    ids2[:, 8:] = (ids2[:, 8:] + 1) % (V - 1)
    out2 = draft(ids2, aux2, anchors, keep)
    torch.testing.assert_close(out2[:, 1], out[:, 1])
    assert not torch.allclose(draft(ids, aux2 * 0, anchors, keep)[:, 1], out[:, 1])
    logits = draft.logits(out)
    torch.testing.assert_close(logits, draft.norm(out) @ head.T)


def test_config_round_trip_and_hf_config():
    c = _config()
    assert DFlashConfig.from_dict(c.to_dict()) == c
    hf = c.hf_config()
    assert hf["block_size"] == BS and hf["num_target_layers"] == 2
    assert hf["dflash_config"] == {"mask_token_id": V - 1, "target_layer_ids": [1, 3]}
    with pytest.raises(ValueError, match="mask_token_id"):
        DFlashConfig(**{**c.to_dict(), "mask_token_id": V})
