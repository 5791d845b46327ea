"""The DFlash family's SGLang folder, as SGLang's ``DFlashDraftModel`` reads it (``srt/models/dflash.py``).

SGLang serves DFlash *and* Domino with one class, ``DFlashDraftModel``: Domino is
``dflash_config.projector_type: "domino"`` plus its GRU and projector weights
(``speculative/dflash_utils.parse_dflash_draft_config``, ``speculative/domino_utils``).
The folder holds no embedding or head (the engine uses the target's), bf16 weights by
default, ``num_target_layers`` = the target's depth (SGLang checks ``target_layer_ids``
against it) and the layer ids in SGLang's capture order (``algorithms.sglang_layers``).
What SGLang would serve differently from what was trained is refused, with the reason:
SGLang always applies per-head q/k norms, and runs Domino only with
``pure_draft_prefix_len`` 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.algorithms.dflash.model import DFlashDraft
from specforge_lightning.algorithms.export_files import CONFIG_FILE, write_folder
from specforge_lightning.algorithms.sglang_layers import (
    SGLANG_DEFAULT_DTYPE,
    capture_order,
    cast,
    dtype_name,
    permute_blocks,
    target_depth,
)

SGLANG_ARCHITECTURE = "DFlashDraftModel"
TARGET_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # frozen copies of the target's: the engine has them


def sglang_folder(
    draft: DFlashDraft, algorithm: str, context: Mapping[str, Any], dtype: torch.dtype | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and tensors of the SGLang folder; ValueError naming what SGLang would serve wrongly."""
    c = draft.config
    source = f"{algorithm} draft"
    if not c.qk_norm:
        raise ValueError(
            f"{source} was trained without per-head q/k norms (qk_norm: false), but SGLang's DFlashDraftModel "
            "always applies them, so it would serve a different model; retrain with "
            "model.init_args.qk_norm: true (or export --format hf)"
        )
    config = draft.config.hf_config()
    dflash = config["dflash_config"]
    if dflash.get("projector_type") == "domino" and dflash.get("pure_draft_prefix_len") != 1:
        raise ValueError(
            f"{source} has pure_draft_prefix_len {dflash.get('pure_draft_prefix_len')}; SGLang's Domino runtime "
            "requires 1; retrain with model.init_args.pure_draft_prefix_len: 1"
        )
    depth = target_depth(context)
    if depth is None:
        raise ValueError(
            f"{source}: the target's depth is unknown (no readable config.json in target_dir "
            f"{context.get('target_dir')!r}); SGLang needs it as num_target_layers: pass --target_dir"
        )
    order = capture_order(c.target_layer_ids, depth, source)
    tensors = cast(draft.export_state_dict(include_frozen=False), dtype or SGLANG_DEFAULT_DTYPE)
    for name in TARGET_TENSORS:
        tensors.pop(name, None)
    tensors["fc.weight"] = permute_blocks(tensors["fc.weight"], order)
    dflash["target_layer_ids"] = [int(c.target_layer_ids[i]) for i in order]
    dflash["num_target_layers"] = depth
    config.update(
        architectures=[SGLANG_ARCHITECTURE],
        num_target_layers=depth,
        torch_dtype=dtype_name(tensors["fc.weight"].dtype),
        specforge_algorithm=algorithm,
    )
    return config, tensors


def export_sglang(
    draft: DFlashDraft, out_dir: str | Path, algorithm: str, context: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the folder SGLang's ``--speculative-algorithm DFLASH`` serves; ``dtype`` None means bf16."""
    config, tensors = sglang_folder(draft, algorithm, dict(context or {}), dtype)
    return write_folder(out_dir, config, tensors)


def sglang_serve_hint(out_dir: Path) -> str:
    """The launch command for the folder just written: one verify block = the trained block size, its dtype."""
    cfg = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    ids = cfg["dflash_config"]["target_layer_ids"]
    return (
        "serve: python -m sglang.launch_server --model-path <target> --speculative-algorithm DFLASH "
        f"--speculative-draft-model-path {out_dir} --speculative-num-draft-tokens {cfg['block_size']} "
        f"--dtype {cfg['torch_dtype']}  # trained block size {cfg['block_size']}; target layers {ids} "
        f"(output of target layer i, in SGLang's capture order) of {cfg['num_target_layers']}"
    )


__all__ = ["SGLANG_ARCHITECTURE", "export_sglang", "sglang_folder", "sglang_serve_hint"]
