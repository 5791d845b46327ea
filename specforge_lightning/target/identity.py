"""The feature identity: what features ARE, computed the same way by prepare, the producer and the datamodules.

The manifest of a prepared folder (and a stream's manifest) records it
(``data.manifest.IDENTITY_FIELDS``). Prepare and the producer compute the whole
identity for their config; a trainer checks the part it can know cheaply: its
config fields (``datamodules/checks.py``) and the target folder it will load
(:func:`check_target`: the weights hash, from a cached sidecar, and the
tokenizer and chat-template hashes), so features captured from other weights
are refused at set-up, not trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from specforge_lightning.contracts import SCHEMA_VERSION
from specforge_lightning.data.chat import template_hash, tokenizer_hash
from specforge_lightning.data.manifest import TARGET_FIELDS, check_identity
from specforge_lightning.target.prepare_config import PrepareConfig
from specforge_lightning.target.zoo import check_target_folder, weights_hash


def load_tokenizer(target_dir: str | Path) -> Any:
    """The target folder's tokenizer; a folder without tokenizer files or weights is refused, naming them."""
    from transformers import AutoTokenizer

    check_target_folder(target_dir)
    return AutoTokenizer.from_pretrained(str(target_dir))


def target_identity(target_dir: str | Path, tokenizer: Any = None) -> dict[str, str]:
    """The identity fields a target folder decides: weights, tokenizer and chat-template hashes."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(target_dir)
    return {
        "target_weights_hash": weights_hash(target_dir),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template_hash": template_hash(tokenizer),
    }


def feature_identity(cfg: PrepareConfig, target_dir: Path, tokenizer: Any, layer_ids: list[int]) -> dict[str, Any]:
    """The manifest fields that define what the features ARE (see data.manifest.IDENTITY_FIELDS)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "target": cfg.target,
        **target_identity(target_dir, tokenizer),
        "layer_ids": layer_ids,
        "capture_dtype": cfg.capture_dtype,
        "max_length": cfg.max_length,
        "corpus": cfg.corpus,
        "skip_samples": cfg.skip_samples,
        "num_samples": cfg.num_samples,
        "num_val_samples": cfg.num_val_samples,
        "max_messages": cfg.max_messages,
        "train_only_last_turn": cfg.train_only_last_turn,
        "draft_vocab_size": cfg.draft_vocab_size,
        "shard_size": cfg.shard_size,
        "regenerate": cfg.regenerate,
        "regenerate_max_new_tokens": cfg.regenerate_max_new_tokens if cfg.regenerate else None,
        "regenerate_samples": cfg.regenerate_samples if cfg.regenerate else None,
    }


def check_target(manifest: Mapping[str, Any], target_dir: str | Path, where: str, fix: str) -> None:
    """Refuse features captured from another state of ``target_dir`` (weights, tokenizer, chat template).

    Only the fields the manifest records are compared (older manifests may lack them);
    nothing is loaded when it records none.
    """
    recorded = [name for name in TARGET_FIELDS if manifest.get(name)]
    if not recorded:
        return
    current = target_identity(target_dir)
    check_identity(
        manifest,
        {name: current[name] for name in recorded},
        recorded,
        f"{where} do not match this run ({{diff}}): the target folder {target_dir} changed since they were "
        f"captured; {fix}",
    )
