"""What every SGLang export must agree on with SGLang's target-side capture: layer ids, their order, dtype.

SGLang's target captures aux states "before layer id+1" (``set_eagle3_layers_to_capture`` and
``set_dflash_layers_to_capture`` in ``srt/models/llama.py``: ``layers_to_capture = [id + 1]``),
which is our "output of layer id". It appends them while walking its layers, so they arrive
in increasing layer order whatever order the config lists, each layer once, and the output of
the last layer (id N-1) is never captured. A draft trained on another order is exported with
its ``fc`` column blocks permuted to increasing order; what cannot be permuted is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

SGLANG_DEFAULT_DTYPE = torch.bfloat16  # SGLang's --dtype auto turns a float32 draft into float16


def target_depth(context: Mapping[str, Any]) -> int | None:
    """The target's ``num_hidden_layers``: recorded in the context, else read from its folder (None if neither)."""
    if context.get("target_num_layers"):
        return int(context["target_num_layers"])
    folder = Path(str(context.get("target_dir") or ""))
    path = folder / "config.json"
    if not context.get("target_dir") or not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    cfg = {**cfg, **cfg["text_config"]} if isinstance(cfg.get("text_config"), dict) else cfg
    return int(cfg["num_hidden_layers"]) if "num_hidden_layers" in cfg else None


def capture_order(layer_ids: Sequence[int], depth: int | None, source: str) -> list[int]:
    """Positions of ``layer_ids`` in SGLang's capture order (increasing ids); refuses ids SGLang cannot capture.

    ``depth`` None (target folder unknown) skips only the last-layer check.
    """
    ids = [int(i) for i in layer_ids]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(
            f"{source}: layer ids {ids} repeat {repeated}; SGLang captures each target layer once, so it cannot "
            "feed this draft's fc; retrain with distinct layer ids"
        )
    negative = [i for i in ids if i < 0]
    if negative:
        raise ValueError(f"{source}: layer ids {negative} are negative; layer id i is the output of target layer i >= 0")
    if depth is not None:
        last = [i for i in ids if i >= depth - 1]
        if last:
            raise ValueError(
                f"{source}: layer id {last[0]} cannot be captured by SGLang: the target has {depth} layers and "
                f"SGLang captures the output of layer i before layer i+1 runs, so ids above {depth - 2} (the last "
                "layer's output) are never captured; retrain with layer ids <= "
                f"{depth - 2} (data.init_args.prepare.layer_ids)"
            )
    return sorted(range(len(ids)), key=ids.__getitem__)


def permute_blocks(weight: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """``weight`` (out, k·w) with its k input column blocks reordered to ``order``."""
    k = len(order)
    if list(order) == list(range(k)):
        return weight
    blocks = weight.reshape(weight.shape[0], k, weight.shape[1] // k)
    return blocks[:, list(order)].reshape(weight.shape).contiguous()


def cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype``, others (ids, masks) untouched; all contiguous, on CPU."""
    return {
        k: (v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in tensors.items()
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["SGLANG_DEFAULT_DTYPE", "capture_order", "cast", "dtype_name", "permute_blocks", "target_depth"]
