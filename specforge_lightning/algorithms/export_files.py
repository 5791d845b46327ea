"""Exported draft folders on disk: ``config.json`` + ``model.safetensors``, written atomically, read with named errors.

Shared by every algorithm's exporters and loaders; what goes INTO the files is each algorithm's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specforge_lightning.algorithms.base import DraftLoadError
from specforge_lightning.files import atomic_path, write_text_atomic

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The FeatureContext fields an export keeps (target_dir is a hint: it may not exist elsewhere).
CONTEXT_FIELDS = (
    "target_id",
    "target_dir",
    "layer_ids",
    "hidden_size",
    "vocab_size",
    "draft_vocab_size",
    "capture_dtype",
    "max_length",
)
MANIFEST_FIELDS = ("target_weights_hash", "tokenizer_hash", "chat_template_hash", "corpus", "num_samples")


def context_essentials(context: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a FeatureContext dict worth keeping next to a draft (no corpus-sized manifest)."""
    out = {k: context[k] for k in CONTEXT_FIELDS if k in context}
    if "layer_ids" in out:
        out["layer_ids"] = list(out["layer_ids"])
    manifest = context.get("manifest") or {}
    kept = {k: manifest[k] for k in MANIFEST_FIELDS if k in manifest}
    if kept:
        out["manifest"] = kept
    return out


def write_folder(out_dir: str | Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors``, each complete or absent (temp name + rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o666 & ~umask)  # safetensors writes 0600; a served folder is read by other users
    write_text_atomic(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of an exported folder, or a DraftLoadError naming what is wrong."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise DraftLoadError(f"{folder}: not an exported draft folder (no {CONFIG_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DraftLoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise DraftLoadError(f"{path}: expected a JSON object")
    return cfg


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The folder's tensors, names without a ``model.`` prefix."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise DraftLoadError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        return {k.removeprefix("model."): v for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DraftLoadError(f"{path}: not a readable safetensors file ({e})") from e


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "context_essentials",
    "read_export_config",
    "read_weights",
    "write_folder",
]
