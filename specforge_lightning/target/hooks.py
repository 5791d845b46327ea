"""Forward hooks on a transformers target's decoder layers: the one way we read layer outputs in-process.

"Layer id i" is the output of decoder block i (0-based), as in ``target/layers.py``.
Used by the offline capture (``HFTargetEngine``) and by the speculative-decoding
harness, so training features and evaluation read the very same tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model`` for Llama/Qwen), whose forward skips the LM head."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (``model.model.layers`` for Llama/Qwen)."""
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


@contextmanager
def capture_layer_outputs(
    model_or_layers: nn.Module | nn.ModuleList, layer_ids: Sequence[int]
) -> Iterator[dict[int, torch.Tensor]]:
    """While inside, each forward stores layer ``i``'s output (its hidden states) in the yielded dict.

    ``model_or_layers`` is the causal LM or its ``decoder_layers``. The hooks are
    removed on exit, also when the forward raised.
    """
    layers = model_or_layers if isinstance(model_or_layers, nn.ModuleList) else decoder_layers(model_or_layers)
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def store(_module: nn.Module, _args: object, out: object) -> None:
            captured[index] = out[0] if isinstance(out, tuple) else out

        return store

    handles = [layers[i].register_forward_hook(hook(i)) for i in sorted(set(layer_ids))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
