"""The target side of speculative decoding: one sequence through a frozen causal LM with a KV cache.

``forward`` is the chain verify (the new tokens attend causally); ``forward_tree`` verifies a
whole draft tree in ONE forward, with a 4D additive attention mask (each node sees the cache
and its own ancestors) and explicit RoPE positions (cache length + depth); ``keep`` then
compacts the cache to the accepted path, so it equals the cache of decoding those tokens one
by one. ``greedy_generate`` / ``sample_generate`` are the target-only references and baselines.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from specforge_lightning.evaluation.sampling import SamplingParams, target_probs
from specforge_lightning.target.hooks import capture_layer_outputs, decoder_layers


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def tree_attention_mask(parents: Sequence[int], past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, N+1, past+N+1) additive mask for ``[root] + nodes``: the cache, then ancestors-or-self only."""
    n = len(parents) + 1
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[0, 0] = True
    for i, p in enumerate(parents, start=1):
        allowed[i] = allowed[p + 1]  # the parent's ancestors (the root's row for p = -1) ...
        allowed[i, i] = True  # ... and itself
    full = torch.cat([torch.ones(n, past, dtype=torch.bool), allowed], dim=1)
    mask = torch.zeros(full.shape, dtype=dtype).masked_fill(~full, torch.finfo(dtype).min)
    return mask[None, None].to(device)


class TargetRunner:
    """One sequence through a frozen causal LM with a KV cache; returns greedy ids (and aux states).

    ``layer_ids`` are the decoder layers whose outputs the draft reads (layer i =
    output of block i, as captured for training); when given, every ``forward``
    also returns their concatenation (T, len(layer_ids)·H) for the new tokens.
    """

    def __init__(self, model: nn.Module, layer_ids: Sequence[int] = ()) -> None:
        self.model = model.eval()
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self.device = next(model.parameters()).device
        self._cache_key = _cache_kwarg(model)
        self._layers = decoder_layers(model)
        bad = [i for i in self.layer_ids if not 0 <= i < len(self._layers)]
        if bad:
            raise ValueError(f"aux layer ids {bad} are outside the target's {len(self._layers)} layers")
        self.cache: Any = None

    @property
    def length(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def reset(self) -> None:
        from transformers import DynamicCache

        try:
            self.cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x takes no config
            self.cache = DynamicCache()

    def crop(self, keep: int) -> None:
        """Keep the first ``keep`` cached positions (drop rejected draft tokens)."""
        remove = self.length - keep
        if remove > 0:
            self.cache.crop(-remove)

    def keep(self, start: int, rows: Sequence[int]) -> None:
        """Keep cached positions ``0..start-1`` and then ``start + r`` for ``r`` in ``rows`` (the accepted path)."""
        if list(rows) == list(range(len(rows))):
            self.crop(start + len(rows))
            return
        index = torch.tensor([*range(start), *(start + r for r in rows)], device=self.device)
        for layer in self.cache.layers:
            if getattr(layer, "is_sliding", False):
                raise ValueError("tree verification needs a full-attention KV cache (no sliding-window layers)")
            layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, index.to(layer.values.device))

    def _run(self, ids: Sequence[int], keep: int, **extra: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is None:
            self.reset()
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        kwargs = {self._cache_key: self.cache, "use_cache": True, "logits_to_keep": keep, **extra}
        if not self.layer_ids:
            return self.model(input_ids=x, **kwargs).logits[0], None
        with capture_layer_outputs(self._layers, self.layer_ids) as captured:
            out = self.model(input_ids=x, **kwargs)
        return out.logits[0], torch.cat([captured[i][0] for i in self.layer_ids], dim=-1)

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], keep_logits: int | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Append ``ids`` to the cache; greedy next ids for the last ``keep_logits`` inputs (default all)."""
        logits, aux = self._run(ids, len(ids) if keep_logits is None else keep_logits)
        return logits.argmax(-1).tolist(), aux

    @torch.inference_mode()
    def forward_logits(self, ids: Sequence[int], keep_logits: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``forward``, but the float logits (T, V) of the kept inputs."""
        return self._run(ids, len(ids) if keep_logits is None else keep_logits)

    @torch.inference_mode()
    def forward_tree(self, root: int, tokens: Sequence[int], parents: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Verify ``[root] + tokens`` (a tree: ``parents[i]`` is node i's parent, -1 the root) in one forward.

        Returns the logits (N+1, V) and aux states of every row; a chain takes the plain causal path.
        """
        ids = [root, *tokens]
        if list(parents) == list(range(-1, len(tokens) - 1)):
            return self._run(ids, len(ids))
        past = self.length
        depth = [0]
        for p in parents:
            depth.append(depth[p + 1] + 1)
        positions = torch.tensor([[past + d for d in depth]], device=self.device)
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        mask = tree_attention_mask(parents, past, dtype, self.device)
        return self._run(ids, len(ids), attention_mask=mask, position_ids=positions)


def greedy_generate(runner: TargetRunner, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Target-only greedy decoding, one forward per token: the reference output and the speed baseline."""
    runner.reset()
    out = [runner.forward(prompt_ids, keep_logits=1)[0][-1]]
    while len(out) < max_new_tokens and out[-1] not in eos_ids:
        out.append(runner.forward(out[-1:])[0][-1])
    return out


def sample_generate(
    runner: TargetRunner,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: set[int],
    sampling: SamplingParams,
    generator: torch.Generator,
) -> list[int]:
    """Target-only sampling (temperature, top-p), one forward per token: the sampled runs' speed baseline."""
    runner.reset()
    logits, _ = runner.forward_logits(prompt_ids, keep_logits=1)
    out = [int(torch.multinomial(target_probs(logits[-1], sampling), 1, generator=generator))]
    while len(out) < max_new_tokens and out[-1] not in eos_ids:
        logits, _ = runner.forward_logits(out[-1:])
        out.append(int(torch.multinomial(target_probs(logits[-1], sampling), 1, generator=generator)))
    return out


__all__ = ["TargetRunner", "greedy_generate", "sample_generate", "tree_attention_mask"]
