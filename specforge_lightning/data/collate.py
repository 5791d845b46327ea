"""Collation: unpadded per-sample tensors to one right-padded batch."""

from __future__ import annotations

import torch


def pad_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad every tensor's dim 0 (the sequence axis) with zeros to the batch max, then stack.

    Adds ``attention_mask`` (B, S) int64, 1 on real tokens, unless the samples bring their own.
    """
    if not samples:
        raise ValueError("pad_collate needs at least one sample")
    keys = set(samples[0])
    lengths = []
    for i, s in enumerate(samples):
        if set(s) != keys:
            raise ValueError(f"sample {i} has features {sorted(s)}, sample 0 has {sorted(keys)}")
        lens = {k: int(t.shape[0]) for k, t in s.items() if t.dim() > 0}
        if len(set(lens.values())) > 1:
            raise ValueError(f"sample {i}: features disagree on the sequence length (dim 0): {lens}")
        lengths.append(next(iter(lens.values()), 0))
    batch, seq = len(samples), max(lengths)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        first = samples[0][key]
        if first.dim() == 0:
            out[key] = torch.stack([s[key] for s in samples])
            continue
        padded = first.new_zeros((batch, seq, *first.shape[1:]))
        for i, s in enumerate(samples):
            t = s[key]
            if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
                raise ValueError(
                    f"feature {key!r}: sample {i} is {tuple(t.shape)} {t.dtype}, "
                    f"sample 0 is {tuple(first.shape)} {first.dtype}"
                )
            padded[i, : t.shape[0]] = t
        out[key] = padded
    if "attention_mask" not in out:
        mask = torch.zeros(batch, seq, dtype=torch.int64)
        for i, length in enumerate(lengths):
            mask[i, :length] = 1
        out["attention_mask"] = mask
    return out
