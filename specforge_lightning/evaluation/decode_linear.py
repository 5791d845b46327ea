"""Faster float32 ``nn.Linear`` for decoding on CPU (one to a few rows per call).

Decoding multiplies one row (a target-only step) or ``k + 1`` rows (a verify pass)
by every weight matrix, and PyTorch's CPU kernels for ``x @ W.T`` are slow at that
shape: on the quickstart's 2 cores SmolLM2's 49,152 x 576 head took 9.9 ms for
one row, 24 ms for six. A second, transposed copy of the weight serves one row at
4.8 ms, and ``(W @ x.T).T`` six rows at 8.1 ms. Whole decode steps: 58 -> 46 ms
per token, 76 -> 61 ms per 6-token verify pass. The maths is the same fp32 product
summed in another order; more rows (a prompt's prefill) keep ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_FEW_ROWS = 16  # up to this many rows take the weight-major product; prefill keeps F.linear


class DecodeLinear(nn.Module):
    """Wraps an ``nn.Linear`` (sharing its parameters) with one extra transposed weight copy."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # shared: a tied embedding stays tied
        self.bias = linear.bias
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1:
            y = x @ self.weight_t
        elif rows <= MAX_FEW_ROWS:
            y = (self.weight @ x.reshape(rows, -1).mT).mT.reshape(*x.shape[:-1], self.out_features)
        else:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias


def use_decode_linears(model: nn.Module) -> int:
    """Swap every float32 ``nn.Linear`` under ``model`` for a ``DecodeLinear``, in place; returns how many.

    Only for inference on CPU (the copy doubles those weights' memory; GPUs have no such gap).
    Call it after the weights are final (loaded, cast, moved): the transposed copy is taken
    here, so a later change to a weight would reach the multi-row path but not the one-row one.
    """
    swapped = 0
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
            setattr(model, name, DecodeLinear(child))
            swapped += 1
        else:
            swapped += use_decode_linears(child)
    return swapped
