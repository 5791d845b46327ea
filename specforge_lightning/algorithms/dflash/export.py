"""Self-contained HF-style folders for the DFlash family (DFlash, Domino): write and read back.

The folder holds ``config.json`` (the upstream-style keys: ``block_size``,
``num_target_layers``, ``layer_types``, ``dflash_config`` with the MASK id and
target layer ids, plus our own ``draft_config`` and a format marker) and
``model.safetensors`` with every draft tensor *and* the frozen target
``embed_tokens.weight`` / ``lm_head.weight``, so the draft reloads without the
target folder. ``load_hf`` rebuilds the draft bit for bit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from specforge_lightning.algorithms.dflash.model import DFlashConfig, DFlashDraft

FORMAT_PREFIX = "specforge_lightning."
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
FROZEN = ("embed_tokens.weight", "lm_head.weight")


def _draft_classes() -> dict[str, tuple[type[DFlashConfig], type[DFlashDraft]]]:
    from specforge_lightning.algorithms.domino.model import DominoConfig, DominoDraft

    return {"dflash": (DFlashConfig, DFlashDraft), "domino": (DominoConfig, DominoDraft)}


def export_hf(
    draft: DFlashDraft, out_dir: str | Path, algorithm: str, context: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (each via a temporary name and a rename)."""
    tensors = {}
    for k, v in draft.export_state_dict(include_frozen=True).items():
        v = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        tensors[k] = v.contiguous().cpu().clone()  # a tied target shares one tensor between embedding and head
    config = draft.config.hf_config()
    config.update(
        specforge_format=FORMAT_PREFIX + algorithm,
        format_version=FORMAT_VERSION,
        algorithm=algorithm,
        draft_config=draft.config.to_dict(),
        feature_context=dict(context or {}),
        torch_dtype=str(tensors["fc.weight"].dtype).removeprefix("torch."),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / f".config.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")
    return out


def load_hf(folder: str | Path) -> tuple[DFlashDraft, dict[str, Any]]:
    """Rebuild a draft written by ``export_hf``; returns ``(draft in eval mode, config.json dict)``."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    algorithm = cfg.get("algorithm")
    classes = _draft_classes()
    if cfg.get("specforge_format") != FORMAT_PREFIX + str(algorithm) or algorithm not in classes:
        raise ValueError(f"{folder}: not a DFlash-family export (format {cfg.get('specforge_format')!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: export format version {cfg.get('format_version')}, this code reads {FORMAT_VERSION}")
    config_cls, draft_cls = classes[algorithm]
    draft = draft_cls(config_cls.from_dict(cfg["draft_config"]))
    tensors = load_file(str(folder / WEIGHTS_FILE))
    frozen = {k: tensors.pop(k) for k in FROZEN}
    draft.load_state_dict(tensors, strict=True, assign=True)
    draft.set_target_weights(frozen["embed_tokens.weight"], frozen["lm_head.weight"])
    return draft.eval().requires_grad_(False), cfg


__all__ = ["export_hf", "load_hf"]
