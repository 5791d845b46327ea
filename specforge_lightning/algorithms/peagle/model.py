"""The P-EAGLE draft: an EAGLE3-style first layer, then standard Llama layers, all depths in one forward.

Parameter names follow upstream SpecForge's ``PEagleDraftModel`` (``embed_tokens``, ``fc``,
``mask_hidden``, ``layers.{i}.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``). Unlike EAGLE3 the
token embedding is trainable (initialised from the target) and saved with the draft.

Two ways to run it, one attention rule (``sampling.attention_allowed``):

* ``forward(input_ids, aux, elements)``: training and teacher forcing, every element of a
  batch at once under a dense (B, N, N) mask.
* ``decode(...)`` with one :class:`~specforge_lightning.algorithms.eagle3.attention.Eagle3Cache`
  per layer: new verified depth-0 slots and the ``k - 1`` MASK slots of the last anchor attend
  causally over the cached depth-0 slots, which is that rule for a single chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specforge_lightning.algorithms.eagle3.attention import Attend, Eagle3Attention, Eagle3Cache, softmax_attend
from specforge_lightning.algorithms.eagle3.model import DraftVocabulary, Eagle3DecoderLayer, shift_left
from specforge_lightning.algorithms.layers import RMSNorm, SwiGLU, rope_cos_sin, rope_inv_freq
from specforge_lightning.algorithms.peagle.sampling import Elements
from specforge_lightning.algorithms.target_weights import TargetGeometry, target_geometry


@dataclass
class PEagleConfig(TargetGeometry):
    """Shape of the draft; ``from_target_config`` copies the target's layer geometry.

    ``num_depths`` is how many tokens one forward drafts (the depths it was trained on).
    """

    draft_vocab_size: int
    target_hidden_size: int
    mask_token_id: int
    aux_layer_ids: tuple[int, ...] = ()
    num_hidden_layers: int = 4
    num_depths: int = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.aux_layer_ids = tuple(int(i) for i in self.aux_layer_ids)
        self.check_layers(self.hidden_act)
        if self.num_hidden_layers < 1 or self.num_depths < 1:
            raise ValueError(f"num_hidden_layers and num_depths must be >= 1 ({self.num_hidden_layers}, {self.num_depths})")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")

    @classmethod
    def from_target_config(
        cls, cfg: Mapping[str, Any], draft_vocab_size: int, aux_layer_ids: Sequence[int], mask_token_id: int,
        num_hidden_layers: int = 4, num_depths: int = 8,
    ) -> PEagleConfig:
        return cls(
            **target_geometry(cfg), draft_vocab_size=int(draft_vocab_size), target_hidden_size=int(cfg["hidden_size"]),
            mask_token_id=int(mask_token_id), aux_layer_ids=tuple(aux_layer_ids),
            num_hidden_layers=int(num_hidden_layers), num_depths=int(num_depths),
        )


class StandardAttention(Eagle3Attention):
    """``Eagle3Attention``'s GQA + RoPE over H inputs: the layers after the first read the residual stream."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)


class StandardLayer(nn.Module):
    """A pre-norm Llama decoder layer (upstream ``PEagleStandardLayer``)."""

    def __init__(self, c: PEagleConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = StandardAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


def cached_attend(cache: Eagle3Cache) -> Attend:
    """Attention of T new queries over ``cache`` plus themselves (causal), appending their keys."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start = cache.length
        keys, values = cache.append(k, v)
        rows = start + torch.arange(q.shape[-2], device=q.device)
        allowed = torch.arange(keys.shape[-2], device=q.device)[None, :] <= rows[:, None]
        return softmax_attend(q, keys, values, allowed.expand(q.shape[0], -1, -1))

    return attend


class PEagleDraft(DraftVocabulary, nn.Module):
    """The parallel multi-depth draft (names as upstream ``PEagleDraftModel``)."""

    def __init__(self, config: PEagleConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=False)
        self.mask_hidden = nn.Parameter(torch.randn(1, 1, 3 * c.target_hidden_size))
        self.layers = nn.ModuleList([Eagle3DecoderLayer(c)] + [StandardLayer(c) for _ in range(c.num_hidden_layers - 1)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(c.vocab_size) < c.draft_vocab_size)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=c.initializer_range)

    # ---- pieces

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rope_cos_sin(position_ids, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), dtype)

    def element_inputs(
        self, tokens: torch.Tensor, aux_projected: torch.Tensor, is_depth0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and hidden inputs (B, N, H): the real token and ``fc(aux)`` at depth 0, MASK and ``fc(mask_hidden)`` deeper."""
        mask_id = torch.full_like(tokens, self.config.mask_token_id)
        emb = self.embed_tokens(torch.where(is_depth0, tokens, mask_id)).to(self.fc.weight.dtype)
        mask_hidden = self.fc(self.mask_hidden.to(self.fc.weight.dtype))
        return emb, torch.where(is_depth0[..., None], aux_projected, mask_hidden.to(aux_projected.dtype))

    def run_layers(
        self, emb: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor, attends: Sequence[Attend]
    ) -> torch.Tensor:
        """The decoder stack; ``attends[i]`` is layer i's attention (one dense mask, or a cache per layer)."""
        cos, sin = self._rope(position_ids, hidden.dtype)
        h = self.layers[0](emb, hidden, cos, sin, attends[0])
        for layer, attend in zip(self.layers[1:], attends[1:]):
            h = layer(h, cos, sin, attend)
        return h

    # ---- training / teacher forcing

    def forward(self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, elements: Elements) -> torch.Tensor:
        """Pre-norm hidden (B, N, H) of every element; padded elements hold garbage the loss never reads."""
        tokens = shift_left(input_ids, 1).gather(1, elements.orig)  # x_{orig+1}: the depth-0 input
        projected = self.fc(aux_hidden.to(self.fc.weight.dtype))
        index = elements.orig[..., None].expand(-1, -1, projected.shape[-1])
        emb, hidden = self.element_inputs(tokens, projected.gather(1, index), elements.depth == 0)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return softmax_attend(q, k, v, elements.allowed)

        return self.run_layers(emb, hidden, elements.position_ids, [attend] * len(self.layers))

    # ---- inference

    @torch.no_grad()
    def decode(
        self, aux: torch.Tensor, next_ids: torch.Tensor, start: int, num_masks: int, caches: list[Eagle3Cache]
    ) -> torch.Tensor:
        """Logits (T + num_masks, Vd) of T new depth-0 slots and the last one's ``num_masks`` MASK slots.

        ``aux`` (T, 3·H_t) and ``next_ids`` (T,) are verified slots at positions ``start..start+T-1``
        (aux of ``x_t`` next to ``x_{t+1}``), appended to ``caches`` for good; the MASK slots sit at
        the following positions and their keys are dropped again before returning.
        """
        T = aux.shape[0]
        device = self.fc.weight.device
        tokens = torch.cat([next_ids.to(device), torch.zeros(num_masks, dtype=torch.long, device=device)])[None]
        is_depth0 = (torch.arange(T + num_masks, device=device) < T)[None]
        projected = self.fc(aux.to(device, self.fc.weight.dtype))
        projected = torch.cat([projected, projected.new_zeros(num_masks, projected.shape[-1])])[None]
        emb, hidden = self.element_inputs(tokens, projected, is_depth0)
        positions = (start + torch.arange(T + num_masks, device=device))[None]
        h = self.run_layers(emb, hidden, positions, [cached_attend(c) for c in caches])
        for cache in caches:
            cache.truncate(start + T)
        return self.compute_logits(h[0])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}


__all__ = ["PEagleConfig", "PEagleDraft", "StandardAttention", "StandardLayer", "cached_attend"]
