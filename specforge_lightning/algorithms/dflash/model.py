"""The DFlash draft: a few Qwen3-style layers that predict a whole block of tokens at once.

The draft owns no embedding and no output head: noise blocks ``[anchor, MASK, ...]``
are embedded with the target's frozen ``embed_tokens`` and its hidden states are read
out with the target's frozen ``lm_head`` (both non-persistent buffers, reloaded from
the target folder, never checkpointed). The target's captured layers are projected
once into a context ``ctx = hidden_norm(fc(concat layers))``; every draft layer takes
its queries from the block stream and its keys/values from the context *and* the
block (reference notes §4.4).

Attention of block b (anchor a_b) is: context positions ``< a_b`` (strictly: the
anchor's own target hidden is not available at drafting time) plus every position
of its own block (bidirectional). ``block_attention_mask`` builds that mask densely;
``block_attend`` computes the same attention in factored form (context part
(T, S) plus a per-block (bs, bs) part), which never materialises the (T, S + T)
matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specforge_lightning.algorithms.layers import RMSNorm, SwiGLU, apply_rope, rope_cos_sin, rope_inv_freq
from specforge_lightning.algorithms.target_weights import TargetGeometry, target_geometry

QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_next")


@dataclass
class DFlashConfig(TargetGeometry):
    """Shape of the draft: the target's layer geometry plus the block settings."""

    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    num_hidden_layers: int = 1
    block_size: int = 16
    qk_norm: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.target_layer_ids = tuple(int(i) for i in self.target_layer_ids)
        if not self.target_layer_ids:
            raise ValueError("DFlash needs at least one target layer")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        self.check_layers(self.hidden_act)
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the embedding [0, {self.vocab_size})")

    @property
    def num_target_layers(self) -> int:
        return len(self.target_layer_ids)

    # The names the evaluation harness reads from any draft config (EAGLE3's has them as fields).
    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        return self.target_layer_ids

    @property
    def target_hidden_size(self) -> int:
        return self.hidden_size

    @property
    def draft_vocab_size(self) -> int:
        return self.vocab_size

    @classmethod
    def from_target_config(
        cls,
        cfg: Mapping[str, Any],
        target_layer_ids: Sequence[int],
        mask_token_id: int,
        num_hidden_layers: int = 1,
        block_size: int = 16,
        qk_norm: bool | None = None,
    ) -> DFlashConfig:
        """Copy the target's geometry from its ``config.json``; q/k norms follow the target by default."""
        if qk_norm is None:
            qk_norm = str(cfg.get("model_type", "")) in QK_NORM_MODEL_TYPES
        return cls(
            **target_geometry(cfg),
            target_layer_ids=tuple(target_layer_ids),
            mask_token_id=int(mask_token_id),
            num_hidden_layers=int(num_hidden_layers),
            block_size=int(block_size),
            qk_norm=bool(qk_norm),
        )

    def hf_config(self) -> dict[str, Any]:
        """A Qwen3-style ``config.json`` with the upstream DFlash keys (``dflash_config``, ``block_size``, ...).

        ``num_target_layers`` here is the number of captured layers; the exporters, which know the
        target, overwrite it with the TARGET's depth, as SGLang and upstream read it.
        """
        return {
            "architectures": ["DFlashDraftModel"],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": False,
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": list(self.target_layer_ids)},
        }


# --------------------------------------------------------------------------- masks and attention


def block_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """RoPE positions (B, N, bs) of the block slots: ``anchor + j``."""
    return anchors[..., None] + torch.arange(block_size, device=anchors.device)


def block_attention_mask(anchors: torch.Tensor, keep: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Dense mask (B, N·bs, S + N·bs): True where a block query may attend.

    Keys are the S context positions followed by the N·bs block slots. A query of
    block b sees context ``< anchors[b]`` and its whole own block. A padded block
    (``keep`` False) sees only its own block, so no row is empty (its outputs carry
    zero loss weight; upstream lets it see nothing).
    """
    B, N = anchors.shape
    bs = block_size
    ctx = torch.arange(seq_len, device=anchors.device)[None, None, :] < anchors[..., None]  # (B, N, S)
    ctx = ctx & keep[..., None]
    ctx = ctx[:, :, None, :].expand(B, N, bs, seq_len).reshape(B, N * bs, seq_len)
    own = torch.eye(N, dtype=torch.bool, device=anchors.device).repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    return torch.cat([ctx, own[None].expand(B, -1, -1)], dim=-1)


def block_attend(
    q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, k_blk: torch.Tensor, v_blk: torch.Tensor,
    ctx_allowed: torch.Tensor,
) -> torch.Tensor:
    """Exact softmax attention over (allowed) context keys plus the query's own block.

    q: (B, kv, g, N, bs, d); k_ctx, v_ctx: (B, kv, S, d); k_blk, v_blk: (B, kv, N, bs, d);
    ctx_allowed: (B, N, S) bool. One fp32 softmax spans both key sets. Returns q's shape.
    """
    scale = q.shape[-1] ** -0.5
    s_ctx = torch.einsum("bhgnid,bhsd->bhgnis", q, k_ctx).float() * scale
    s_ctx = s_ctx.masked_fill(~ctx_allowed[:, None, None, :, None, :], torch.finfo(torch.float32).min)
    s_blk = torch.einsum("bhgnid,bhnjd->bhgnij", q, k_blk).float() * scale
    probs = torch.cat([s_ctx, s_blk], dim=-1).softmax(dim=-1).to(q.dtype)
    S = k_ctx.shape[-2]
    out = torch.einsum("bhgnis,bhsd->bhgnid", probs[..., :S], v_ctx)
    return out + torch.einsum("bhgnij,bhnjd->bhgnid", probs[..., S:], v_blk)


class DFlashAttention(nn.Module):
    """GQA attention: queries from the block stream, keys/values from the context and the block."""

    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (RoPE applied) and values of x (B, *L, H) → (B, kv, *L, d)."""
        shape = (*x.shape[:-1], self.n_kv, self.head_dim)
        k, v = self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k, v = k.movedim(-2, 1), v.movedim(-2, 1)
        return apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1)), v

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, rope_blk: tuple[torch.Tensor, torch.Tensor],
        rope_ctx: tuple[torch.Tensor, torch.Tensor], ctx_allowed: torch.Tensor,
    ) -> torch.Tensor:
        """x: (B, N, bs, H) block stream; ctx: (B, S, H); rope_*: cos/sin (B, N, bs, d) and (B, S, d)."""
        B, N, bs, _ = x.shape
        g = self.n_heads // self.n_kv
        cos_b, sin_b = (t.to(x.dtype) for t in rope_blk)
        cos_c, sin_c = (t.to(x.dtype) for t in rope_ctx)
        q = self.q_proj(x).view(B, N, bs, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.view(B, N, bs, self.n_kv, g, self.head_dim).permute(0, 3, 4, 1, 2, 5)  # (B, kv, g, N, bs, d)
        q = apply_rope(q, cos_b[:, None, None], sin_b[:, None, None])
        k_blk, v_blk = self._kv(x, cos_b, sin_b)
        k_ctx, v_ctx = self._kv(ctx, cos_c, sin_c)
        out = block_attend(q, k_ctx, v_ctx, k_blk, v_blk, ctx_allowed)
        return self.o_proj(out.permute(0, 3, 4, 1, 2, 5).reshape(B, N, bs, self.n_heads * self.head_dim))


class DFlashDecoderLayer(nn.Module):
    """Pre-norm layer: ``h += attn(norm(h), ctx)``; ``h += mlp(norm(h))``. The context is not re-normed here."""

    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.self_attn = DFlashAttention(c)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: torch.Tensor, rope_blk: Any, rope_ctx: Any, ctx_allowed: torch.Tensor):
        h = h + self.self_attn(self.input_layernorm(h), ctx, rope_blk, rope_ctx, ctx_allowed)
        return h + self.mlp(self.post_attention_layernorm(h))


class FrozenTensor(nn.Module):
    """A frozen target matrix (V, H) held as a non-persistent buffer: never trained, never checkpointed."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, cols), persistent=False)


# --------------------------------------------------------------------------- the draft


class DFlashDraft(nn.Module):
    """DFlash draft model. Trainable: ``fc``, ``hidden_norm``, ``layers``, ``norm``; frozen: embedding, head."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed_tokens = FrozenTensor(c.vocab_size, c.hidden_size)
        self.lm_head = FrozenTensor(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(c.num_target_layers * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def set_target_weights(self, embedding: torch.Tensor, head: torch.Tensor) -> None:
        """Attach the target's frozen embedding and output head (V, H); tied heads pass the same tensor."""
        want = (self.config.vocab_size, self.config.hidden_size)
        for name, t in (("embedding", embedding), ("head", head)):
            if tuple(t.shape) != want:
                raise ValueError(f"target {name} has shape {tuple(t.shape)}, the draft needs {want}")
        self.embed_tokens.weight = embedding
        self.lm_head.weight = head

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_tokens.weight).to(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits ``lm_head(norm(hidden))``, computed in the head's dtype."""
        x = self.norm(hidden)
        return F.linear(x.to(self.lm_head.weight.dtype), self.lm_head.weight)

    def context(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """``hidden_norm(fc(concat target layers))`` (B, S, H), computed once and shared by every layer."""
        return self.hidden_norm(self.fc(aux_hidden.to(self.dtype)))

    def block_ids(self, input_ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Noise blocks (B, N, bs): the anchor token followed by bs-1 MASK tokens."""
        B, N = anchors.shape
        ids = torch.full((B, N, self.config.block_size), self.config.mask_token_id, device=input_ids.device)
        ids[..., 0] = input_ids.gather(1, anchors)
        return ids

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rope_cos_sin(position_ids, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), dtype)

    def forward(
        self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor,
        block_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pre-norm output hidden (B, N, bs, H) of the blocks anchored at ``anchors`` (B, N).

        ``input_ids`` (B, S) and ``aux_hidden`` (B, S, k·H) are the context; ``keep`` (B, N)
        marks real anchors. ``block_ids`` overrides the noise blocks (inference feeds its own).
        """
        B, S = input_ids.shape
        ctx = self.context(aux_hidden)
        ids = self.block_ids(input_ids, anchors) if block_ids is None else block_ids
        h = self.embed(ids)
        rope_blk = self._rope(block_positions(anchors, self.config.block_size), h.dtype)
        rope_ctx = self._rope(torch.arange(S, device=input_ids.device).expand(B, S), h.dtype)
        ctx_allowed = (torch.arange(S, device=input_ids.device)[None, None, :] < anchors[..., None]) & keep[..., None]
        for layer in self.layers:
            h = layer(h, ctx, rope_blk, rope_ctx, ctx_allowed)
        return h

    def export_state_dict(self, include_frozen: bool = True) -> dict[str, torch.Tensor]:
        """Trainable tensors plus (if asked) the frozen ``embed_tokens.weight`` and ``lm_head.weight``."""
        sd = {k: v.detach() for k, v in self.state_dict().items()}
        if include_frozen:
            sd["embed_tokens.weight"] = self.embed_tokens.weight.detach()
            sd["lm_head.weight"] = self.lm_head.weight.detach()
        return sd


__all__ = [
    "DFlashAttention",
    "DFlashConfig",
    "DFlashDecoderLayer",
    "DFlashDraft",
    "block_attend",
    "block_attention_mask",
    "block_positions",
]
