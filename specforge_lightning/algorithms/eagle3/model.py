"""The EAGLE3 draft: one Llama decoder layer fed by the target's hidden states.

Parameter names match SGLang's ``LlamaForCausalLMEagle3`` one to one, so an
export is the state dict itself (plus ``embed_tokens.weight`` if wanted).

Two ways to run it:

* ``ttt_forward`` — training. Unrolls ``length`` test-time-training steps over a
  whole padded batch at once (upstream EAGLE3 "TTT"): step 0 reads ``fc(aux)``,
  step k reads step k-1's output and the tokens shifted k more places; the
  query at (position t, step k) sees step-0 keys at positions <= t plus the
  keys of steps 1..k at the same position t.
* ``draft_step`` — inference, with an ``Eagle3Cache``. A chain step at the
  position after the prefix attends to the prefix keys and the earlier chain
  steps, which is exactly the TTT attention pattern above.

Both attention patterns live in ``attention.py``; the initialisers that start a fresh
draft from target weights or fitted heads in ``init.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specforge_lightning.algorithms.eagle3.attention import (
    Attend,
    Eagle3Attention,
    Eagle3Cache,
    RowSubset,
    TTTAttend,
    softmax_attend,
)
from specforge_lightning.algorithms.layers import RMSNorm, SwiGLU, rope_cos_sin, rope_inv_freq
from specforge_lightning.algorithms.target_weights import TargetGeometry, target_geometry


@dataclass
class Eagle3Config(TargetGeometry):
    """Shape of the draft. ``from_target_config`` copies the target's layer geometry."""

    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.aux_layer_ids = tuple(int(i) for i in self.aux_layer_ids)
        self.check_layers(self.hidden_act)

    @classmethod
    def from_target_config(
        cls, cfg: Mapping[str, Any], draft_vocab_size: int, aux_layer_ids: Sequence[int]
    ) -> Eagle3Config:
        """Copy the target's layer geometry from its ``config.json`` dict."""
        return cls(
            **target_geometry(cfg),
            draft_vocab_size=int(draft_vocab_size),
            target_hidden_size=int(cfg["hidden_size"]),
            aux_layer_ids=tuple(aux_layer_ids),
        )

    def sglang_config(self) -> dict[str, Any]:
        """``config.json`` for SGLang's ``LlamaForCausalLMEagle3`` (tie_word_embeddings must be false)."""
        out = {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "tie_word_embeddings": False,
        }
        if self.aux_layer_ids:
            out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)}
        return out


class Eagle3DecoderLayer(nn.Module):
    """The EAGLE3 midlayer: attention over ``[input_layernorm(emb); hidden_norm(hidden)]``, then a SwiGLU MLP."""

    def __init__(self, c: Eagle3Config) -> None:
        super().__init__()
        self.self_attn = Eagle3Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(
        self, emb: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class FrozenEmbedding(nn.Module):
    """The target's token embedding, held as a non-persistent buffer: frozen and never checkpointed."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_embeddings, dim), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def shift_left(x: torch.Tensor, n: int = 1, fill: int | float = 0) -> torch.Tensor:
    """``out[:, t] = x[:, t + n]``, padding the last ``n`` positions with ``fill``."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat([x[:, n:], pad], dim=1)


# --------------------------------------------------------------------------- the draft


class DraftVocabulary:
    """The draft-vocabulary head EAGLE3 and P-EAGLE share: ``d2t``/``t2d`` buffers and ``lm_head(norm(h))``.

    Mixed into an ``nn.Module`` that registers ``d2t``, ``t2d``, ``norm`` and ``lm_head``.
    """

    d2t: torch.Tensor
    t2d: torch.Tensor
    norm: nn.Module
    lm_head: nn.Linear

    def set_vocab_mapping(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocab ids to target ids: ``draft_id + d2t[draft_id]``."""
        return draft_ids + self.d2t[draft_ids]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits ``lm_head(norm(hidden))``."""
        return self.lm_head(self.norm(hidden))


class Eagle3Draft(DraftVocabulary, nn.Module):
    """EAGLE3 draft model (names as SGLang's ``LlamaForCausalLMEagle3``)."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        c = self.config = config
        self.embed_tokens = FrozenEmbedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        # Default mapping: the draft vocab is the first Vd target ids.
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(c.vocab_size) < c.draft_vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    # ---- vocabulary

    # ---- building blocks

    def project_aux(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """``fc`` over the concatenated captured target layers (3·H_t → H)."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Frequencies are recomputed (d/2 numbers), not a buffer that precision plugins would cast to bf16.
        c = self.config
        return rope_cos_sin(position_ids, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), dtype)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids).to(self.fc.weight.dtype)

    # ---- training

    def ttt_forward(
        self,
        input_ids: torch.Tensor,
        aux_hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        length: int = 7,
        position_ids: torch.Tensor | None = None,
        with_logits: bool = True,
        later_rows: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """Unroll ``length`` TTT steps; returns ``[(logits_k (B,S,Vd), hidden_k (B,S,H))]``.

        ``with_logits=False`` leaves the logits as None, for a loss that applies
        ``compute_logits`` to the scored positions only.

        ``input_ids`` are the batch's raw ids (x_t at t): step k feeds x_{t+1+k} at
        position t (shift 1+k, zero-padded), next to hidden ``fc(aux)_t`` (k=0) or
        step k-1's pre-norm output at t (k>0), with RoPE position ``position_ids + k``.
        ``attention_mask`` (B,S) masks padded keys; queries are causal.

        ``later_rows`` (B,S) bool, optional: the positions any step k >= 1 will be
        scored at. Steps k >= 1 only read step-0 keys and their own position's
        keys, so they are computed at these rows alone (prompts and padding are
        skipped) and the other rows of ``hidden_k`` are zero. Exact for every
        scored position; the loss must not read the others.
        """
        B, S = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = torch.arange(S, device=device).expand(B, S)
        causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & attention_mask.bool()[:, None, :]
        attend = TTTAttend(allowed)
        hidden = self.project_aux(aux_hidden)
        emb = self._embed(shift_left(input_ids, 1))
        cos, sin = self._rope(position_ids, hidden.dtype)
        hidden = self.midlayer(emb, hidden, cos, sin, attend)
        outputs = [(self.compute_logits(hidden) if with_logits else None, hidden)]
        if length == 1:
            return outputs
        rows = RowSubset(later_rows) if later_rows is not None else None
        if rows is not None:
            hidden, position_ids = rows.take(hidden), rows.take(position_ids)
            attend.allowed = rows.take(allowed)
        for k in range(1, length):
            ids = shift_left(input_ids, 1 + k)
            emb = self._embed(rows.take(ids) if rows is not None else ids)
            cos, sin = self._rope(position_ids + k, hidden.dtype)
            hidden = self.midlayer(emb, hidden, cos, sin, attend)
            full = rows.put(hidden, S) if rows is not None else hidden
            outputs.append((self.compute_logits(full) if with_logits else None, full))
        return outputs

    # ---- inference

    @torch.no_grad()
    def draft_step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Eagle3Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Eagle3Cache]:
        """One draft forward over T new positions, appending their keys to ``cache``.

        Alignment (as in training): slot t pairs the hidden state *of* position t
        with the token *after* it (x_{t+1}), at RoPE position t.

        * First call / after each verification: ``hidden`` is the target's captured
          aux states (B,T,3·H_t), concatenated in ``aux_layer_ids`` order; ``fc`` is
          applied here. ``input_ids`` are the next tokens, ``position_ids`` the positions
          of the hidden states.
        * Chain steps: ``hidden`` is the previous call's ``hidden_out`` (B,T,H, pre-norm)
          for the slot being extended, ``input_ids`` the token just drafted there, and
          ``position_ids`` one more than that slot's previous position.

        A hidden of width 3·H_t is treated as aux, a width of H as a draft hidden.
        Queries attend to every cached key plus the new keys causally. Chain steps
        append keys too: before feeding the next verified positions, call
        ``cache.truncate(n)`` with n = the number of slots built from target hiddens
        (the verified prefix), which drops every drafted slot. Returns
        ``(draft_logits (B,T,Vd), hidden_out (B,T,H), cache)``; map a sampled draft id
        with ``to_target_ids``.
        """
        cache = Eagle3Cache() if cache is None else cache
        c = self.config
        if hidden.shape[-1] == 3 * c.target_hidden_size and hidden.shape[-1] != c.hidden_size:
            hidden = self.project_aux(hidden)
        hidden = hidden.to(self.fc.weight.dtype)
        T = input_ids.shape[1]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            start = cache.length
            keys, values = cache.append(k, v)
            rows = start + torch.arange(T, device=q.device)
            allowed = torch.arange(keys.shape[-2], device=q.device)[None, :] <= rows[:, None]
            return softmax_attend(q, keys, values, allowed.expand(q.shape[0], T, -1))

        cos, sin = self._rope(position_ids, hidden.dtype)
        out = self.midlayer(self._embed(input_ids), hidden, cos, sin, attend)
        return self.compute_logits(out), out, cache

    # ---- export and initialisation

    def export_state_dict(self, include_embedding: bool = True) -> dict[str, torch.Tensor]:
        """SGLang-named tensors: the state dict, plus ``embed_tokens.weight`` if asked."""
        sd = {k: v.detach() for k, v in self.state_dict().items()}
        if include_embedding:
            sd["embed_tokens.weight"] = self.embed_tokens.weight.detach()
        return sd

    @torch.no_grad()
    def init_from_target(
        self,
        target_state_dict: Mapping[str, torch.Tensor],
        target_config: Mapping[str, Any],
        *,
        lm_head: bool = True,
        norm: bool = True,
        fc: bool = True,
        midlayer: bool = True,
        layer: int = -1,
        fc_chunk: int = -1,
        emb_half_scale: float = 0.0,
    ) -> list[str]:
        """Smart initialisation from target weights; each part is a switch. Returns the names set.

        * ``lm_head``: the target head's rows for the draft vocab (head = ``lm_head.weight``,
          or the embedding when tied).
        * ``norm``: the target's final norm.
        * ``fc``: identity on aux chunk ``fc_chunk`` (default the last captured layer), zeros elsewhere.
        * ``midlayer``: from target decoder layer ``layer`` (default the last): q/k/v hidden-half
          columns, o_proj, the MLP and both norms (``input_layernorm`` and ``hidden_norm`` both get
          the target's input norm); the embedding-half q/k/v columns are the current (random)
          ones times ``emb_half_scale`` (0 → zeros).

        ``target_state_dict`` may use HF names with or without the ``model.`` prefix.
        """
        c = self.config
        sd = {k.removeprefix("model."): v for k, v in target_state_dict.items()}
        done: list[str] = []

        def put(param: torch.Tensor, name: str, value: torch.Tensor) -> None:
            if param.shape != value.shape:
                raise ValueError(f"smart init: {name} has shape {tuple(value.shape)}, draft needs {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
            done.append(name)

        if lm_head:
            head = sd.get("lm_head.weight")
            if head is None or target_config.get("tie_word_embeddings", False):
                head = sd["embed_tokens.weight"]
            ids = torch.arange(c.draft_vocab_size, device=self.d2t.device) + self.d2t
            put(self.lm_head.weight, "lm_head.weight", head[ids.to(head.device)])
        if norm:
            put(self.norm.weight, "norm.weight", sd["norm.weight"])
        if fc:
            if c.hidden_size != c.target_hidden_size:
                raise ValueError("fc identity init needs draft hidden == target hidden")
            w = torch.zeros_like(self.fc.weight)
            chunk = fc_chunk % 3
            H = c.hidden_size
            w[:, chunk * H : (chunk + 1) * H] = torch.eye(H, dtype=w.dtype, device=w.device)
            put(self.fc.weight, "fc.weight", w)
        if midlayer:
            n_layers = int(target_config["num_hidden_layers"])
            p = f"layers.{layer % n_layers}."
            H = c.hidden_size
            attn, mid = self.midlayer.self_attn, self.midlayer
            for proj in ("q_proj", "k_proj", "v_proj"):
                mod = getattr(attn, proj)
                hidden_half = sd[p + f"self_attn.{proj}.weight"].to(mod.weight)
                w = torch.cat([mod.weight[:, :H] * emb_half_scale, hidden_half], dim=1)
                put(mod.weight, f"midlayer.self_attn.{proj}.weight", w)
            put(attn.o_proj.weight, "midlayer.self_attn.o_proj.weight", sd[p + "self_attn.o_proj.weight"])
            for proj in ("gate_proj", "up_proj", "down_proj"):
                put(getattr(mid.mlp, proj).weight, f"midlayer.mlp.{proj}.weight", sd[p + f"mlp.{proj}.weight"])
            put(mid.input_layernorm.weight, "midlayer.input_layernorm.weight", sd[p + "input_layernorm.weight"])
            put(mid.hidden_norm.weight, "midlayer.hidden_norm.weight", sd[p + "input_layernorm.weight"])
            put(
                mid.post_attention_layernorm.weight,
                "midlayer.post_attention_layernorm.weight",
                sd[p + "post_attention_layernorm.weight"],
            )
        return done


__all__ = [
    "Eagle3Cache",
    "Eagle3Config",
    "Eagle3Draft",
    "shift_left",
]
