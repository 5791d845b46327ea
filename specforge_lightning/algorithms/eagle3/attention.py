"""The draft's attention: the GQA layer and the two key layouts it attends over.

``Eagle3Attention`` projects and rotates; what its queries see is the ``attend``
callable it is given. Training passes a ``TTTAttend`` (step-0 keys causally plus each
later unrolled step's key at the same position, upstream EAGLE3 "TTT"), inference a
closure over an ``Eagle3Cache``. Both end in ``softmax_attend``: one fp32 softmax over shared
and per-query "diagonal" keys, so the two patterns agree to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from specforge_lightning.algorithms.layers import apply_rope


def softmax_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    k_diag: torch.Tensor | None = None,
    v_diag: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention over shared keys plus per-query "diagonal" keys.

    q: (B, kv, g, T, d) (GQA: g query heads per kv head); k, v: (B, kv, L, d);
    allowed: (B, T, L) bool; k_diag, v_diag: (B, kv, T, n, d) — n extra keys that
    only the query in the same row sees. One softmax (fp32) covers both sets.
    """
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)).float() * scale  # (B, kv, g, T, L)
    scores = scores.masked_fill(~allowed[:, None, None], torch.finfo(torch.float32).min)
    if k_diag is not None:
        diag = torch.einsum("bhgtd,bhtnd->bhgtn", q, k_diag).float() * scale
        scores = torch.cat([scores, diag], dim=-1)
    probs = scores.softmax(dim=-1).to(q.dtype)
    L = k.shape[-2]
    out = torch.matmul(probs[..., :L], v.unsqueeze(2))
    if v_diag is not None:
        out = out + torch.einsum("bhgtn,bhtnd->bhgtd", probs[..., L:], v_diag)
    return out


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TTTAttend:
    """Attention state of one TTT unroll: step-0 keys (causal) and the later steps' diagonal keys."""

    def __init__(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed
        self.k0: torch.Tensor | None = None
        self.v0: torch.Tensor | None = None
        self.k_diag: list[torch.Tensor] = []
        self.v_diag: list[torch.Tensor] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.k0 is None:
            self.k0, self.v0 = k, v
            return softmax_attend(q, k, v, self.allowed)
        self.k_diag.append(k)
        self.v_diag.append(v)
        return softmax_attend(
            q, self.k0, self.v0, self.allowed, torch.stack(self.k_diag, dim=3), torch.stack(self.v_diag, dim=3)
        )


class RowSubset:
    """The same few positions of every sample, gathered into a (B, T') layout and scattered back.

    Rows are right-padded to the longest selection with position 0; padded rows
    compute garbage that ``put`` never writes back.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        B, S = mask.shape
        counts = mask.sum(1)
        width = max(1, int(counts.max()))
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # selected positions first, in order
        self.index = order[:, :width]  # (B, T')
        self.valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
        self.flat = (self.index + S * torch.arange(B, device=mask.device)[:, None])[self.valid]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` (B, S, ...) at the selected positions: (B, T', ...)."""
        idx = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return torch.gather(x, 1, idx)

    def put(self, x: torch.Tensor, S: int) -> torch.Tensor:
        """Scatter (B, T', H) rows back into a zero (B, S, H) tensor."""
        B, _, H = x.shape
        out = x.new_zeros(B * S, H)
        return out.index_copy(0, self.flat, x[self.valid]).view(B, S, H)


@dataclass
class Eagle3Cache:
    """KV cache of the draft's single layer: keys (RoPE applied) and values, (B, kv, length, d)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        return self.k, self.v

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (drop rejected draft tokens)."""
        if self.k is not None:
            self.k, self.v = self.k[..., :length, :], self.v[..., :length, :]


class Eagle3Attention(nn.Module):
    """GQA attention whose q/k/v read the 2H concat ``[emb; hidden]``; o_proj writes H."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(2 * hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        B, T, _ = x.shape
        g = self.n_heads // self.n_kv
        q = self.q_proj(x).view(B, T, self.n_kv, g, self.head_dim).permute(0, 2, 3, 1, 4)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under autocast q is bf16 while cos is fp32
        q = apply_rope(q, cos[:, None, None], sin[:, None, None])
        k = apply_rope(k, cos[:, None], sin[:, None])
        out = attend(q, k, v)  # (B, kv, g, T, d)
        return self.o_proj(out.permute(0, 3, 1, 2, 4).reshape(B, T, self.n_heads * self.head_dim))


__all__ = ["Attend", "Eagle3Attention", "Eagle3Cache", "RowSubset", "TTTAttend", "softmax_attend"]
