"""DSpark's two small heads on the block backbone: the Markov logit bias and the acceptance predictor.

Every Markov variant turns the previous token (and, for ``gated``/``rnn``, the slot's
post-norm hidden state) into a rank-r latent ``z``; the logit bias is ``W2·z``
(reference notes §4.6):

* ``vanilla``: ``z = W1[prev]``;
* ``gated``: ``z = σ(gate_proj([h; W1[prev]])) ⊙ W1[prev]``;
* ``rnn``: a state s (zero at each block's first slot), ``[g, c, o] = joint_proj([s; W1[prev]; h])``,
  ``s' = σ(g)·s + (1-σ(g))·tanh(c)``, ``z = tanh(o)``.

Training feeds the true previous tokens of a whole block at once (``latents``); drafting
feeds the drafted ones one slot at a time (``step``), and both give the same ``z`` for the
same tokens. Parameter names are SGLang's (``markov_head.markov_w1``, ``gate_proj``,
``joint_proj``, ``confidence_head.proj``), so an export needs no renaming.
"""

from __future__ import annotations

import torch
from torch import nn

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


class MarkovHead(nn.Module):
    """Rank-r previous-token logit bias; ``kind`` picks the variant (see the module docstring)."""

    def __init__(self, kind: str, vocab_size: int, rank: int, hidden_size: int, std: float = 0.02) -> None:
        super().__init__()
        if kind not in MARKOV_HEAD_TYPES:
            raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {kind!r}")
        if rank < 1:
            raise ValueError(f"a Markov head needs markov_rank >= 1, got {rank}")
        self.kind, self.rank = kind, rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)
        # Small weights: the bias starts near zero, so a fresh draft drafts as its DFlash backbone does.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def prev_embed(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """``W1[prev]`` (..., r): also the confidence head's Markov features."""
        return self.markov_w1(prev_ids.long())

    def bias(self, z: torch.Tensor) -> torch.Tensor:
        """Vocab-sized logit bias ``W2·z``."""
        return self.markov_w2(z)

    def step(
        self, prev_ids: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One slot: ``z`` (..., r) from the previous ids (...) and post-norm hidden (..., H); the next rnn state."""
        e = self.prev_embed(prev_ids).to(hidden.dtype)
        if self.kind == "vanilla":
            return e, None
        if self.kind == "gated":
            return torch.sigmoid(self.gate_proj(torch.cat([hidden, e], dim=-1))) * e, None
        if state is None:
            state = torch.zeros_like(e)
        g, c, o = self.joint_proj(torch.cat([state, e, hidden], dim=-1)).chunk(3, dim=-1)
        g = torch.sigmoid(g)
        return torch.tanh(o), g * state + (1.0 - g) * torch.tanh(c)

    def latents(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``z`` (..., P, r) of whole blocks: prev ids (..., P), post-norm hidden (..., P, H), slot by slot for rnn."""
        if self.kind != "rnn":
            return self.step(prev_ids, hidden)[0]
        out, state = [], None
        for p in range(prev_ids.shape[-1]):
            z, state = self.step(prev_ids[..., p], hidden[..., p, :], state)
            out.append(z)
        return torch.stack(out, dim=-2)


class ConfidenceHead(nn.Module):
    """``Linear(H (+r) → 1)``: the logit of the probability that the target accepts the slot's token."""

    def __init__(self, input_dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


__all__ = ["MARKOV_HEAD_TYPES", "ConfidenceHead", "MarkovHead"]
