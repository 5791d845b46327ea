"""The feature manifest: what a prepared feature set or a stream IS, and the checks that refuse a mismatch.

A prepared folder carries ``manifest.json``; a stream announces the same fields in
``stream_manifest.json``. Both are read here, compared field by field
(:func:`manifest_mismatch`), turned into the FeatureContext an algorithm sees
(:func:`feature_context`), and used to refuse streamed refs whose features do not
match before any tensor is fetched (:class:`RefCheck`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from specforge_lightning.contracts import SCHEMA_VERSION, FeatureContext, SampleRef
from specforge_lightning.errors import UserError
from specforge_lightning.files import write_json_atomic

MANIFEST = "manifest.json"
VOCAB_FILE = "vocab_mapping.safetensors"
# Fields that define what the features ARE; any difference makes old shards unusable.
IDENTITY_FIELDS = (
    "schema_version",
    "target",
    "target_weights_hash",
    "layer_ids",
    "capture_dtype",
    "max_length",
    "tokenizer_hash",
    "chat_template_hash",
    "corpus",
    "skip_samples",
    "num_samples",
    "num_val_samples",
    "max_messages",
    "train_only_last_turn",
    "draft_vocab_size",
    "shard_size",
    "regenerate",
    "regenerate_max_new_tokens",
    "regenerate_samples",
)
# What a target capture holds (the manifest's ``features``; older manifests, which lack it, hold these).
STANDARD_FEATURES = ("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state", "target_top1")
OPTIONAL_FEATURES = ("target_top1",)  # older feature sets lack it


# What the target folder a run loads must still be: its weights, tokenizer and chat template.
TARGET_FIELDS = ("target_weights_hash", "tokenizer_hash", "chat_template_hash")
REPAIR_HINT = "rerun prepare with the same config (it repairs damaged shards)"


class StreamSchemaError(UserError, ValueError):
    """A streamed sample does not match the stream's manifest (schema version, features, shapes, dtypes)."""


class FeatureMismatchError(UserError, ValueError):
    """Features (a prepared folder or a stream) are not what this run asks for; the message names the field."""


class MissingFeaturesError(UserError, FileNotFoundError):
    """A folder holds no complete prepared features, or some of its files are missing or damaged."""


def check_identity(
    existing: Mapping[str, Any], wanted: Mapping[str, Any], fields: Sequence[str], message: str
) -> None:
    """The one feature-identity check (prepare, the datamodules, producer and consumer).

    Raises FeatureMismatchError with ``message`` formatted with ``diff`` (the first differing
    field, both values) when a field of ``fields`` that ``wanted`` names differs.
    """
    diff = manifest_mismatch(existing, wanted, fields)
    if diff:
        raise FeatureMismatchError(message.replace("{diff}", diff))


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """``directory/manifest.json``, or None when there is none."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FeatureMismatchError(
            f"{path} is not valid JSON ({e}); delete it and rerun prepare with the same config (good shards are kept)"
        ) from e


def write_manifest(directory: str | Path, manifest: Mapping[str, Any]) -> None:
    """Replace ``directory/manifest.json`` atomically (a reader never sees half a manifest)."""
    write_json_atomic(Path(directory) / MANIFEST, dict(manifest))


def manifest_mismatch(
    existing: Mapping[str, Any], wanted: Mapping[str, Any], fields: Sequence[str] = IDENTITY_FIELDS
) -> str | None:
    """A message naming the first field whose value differs, or None."""
    for name in fields:
        if name in wanted and existing.get(name) != wanted[name]:
            return f"{name}: prepared {existing.get(name)!r}, requested {wanted[name]!r}"
    return None


def captured_features(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The feature names the manifest's samples hold."""
    return tuple(manifest.get("features") or STANDARD_FEATURES)


def feature_context(manifest: Mapping[str, Any], features_dir: str | Path, target_dir: str | Path) -> FeatureContext:
    """What the algorithm learns about the features: ``features_dir`` holds the manifest's vocab mapping file."""
    return FeatureContext(
        target_dir=str(target_dir),
        target_id=manifest["target"],
        layer_ids=tuple(manifest["layer_ids"]),
        hidden_size=manifest["hidden_size"],
        vocab_size=manifest["vocab_size"],
        draft_vocab_size=manifest["draft_vocab_size"],
        vocab_mapping_path=str(Path(features_dir) / manifest["vocab_mapping"]),
        capture_dtype=manifest["capture_dtype"],
        max_length=manifest["max_length"],
        manifest=manifest,
    )


def expected_features(manifest: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Trailing shape and dtype of each captured feature, from a stream or prepare manifest."""
    hidden = int(manifest["hidden_size"])
    dtype = str(manifest["capture_dtype"])
    return {
        "input_ids": ((), "int64"),
        "loss_mask": ((), "int64"),
        "aux_hidden_states": ((len(manifest["layer_ids"]) * hidden,), dtype),
        "last_hidden_state": ((hidden,), dtype),
        "target_top1": ((), "int64"),  # optional: older feature sets lack it
    }


class RefCheck:
    """Refuses refs that do not match the stream's manifest, before any tensor is fetched."""

    def __init__(self, manifest: Mapping[str, Any], required: Sequence[str] | None = None) -> None:
        self.schema_version = int(manifest.get("schema_version", SCHEMA_VERSION))
        self.max_length = int(manifest.get("max_length") or 0)
        self.expected = expected_features(manifest)
        self.required = tuple(required) if required else tuple(k for k in self.expected if k not in OPTIONAL_FEATURES)

    def __call__(self, ref: SampleRef) -> None:
        where = f"sample {ref.sample_id!r}"
        if ref.schema_version != self.schema_version or ref.schema_version != SCHEMA_VERSION:
            raise StreamSchemaError(
                f"{where} has schema_version {ref.schema_version}; the stream announces {self.schema_version} "
                f"and this trainer reads {SCHEMA_VERSION}"
            )
        missing = [name for name in self.required if name not in ref.feature_keys]
        if missing:
            raise StreamSchemaError(f"{where} lacks features {missing} (it has {sorted(ref.feature_keys)})")
        specs = {s.name: s for s in ref.feature_specs}
        lengths = set()
        present = [name for name in OPTIONAL_FEATURES if name in ref.feature_keys and name not in self.required]
        for name in (*self.required, *present):
            spec = specs.get(name)
            if spec is None:
                raise StreamSchemaError(f"{where} has no shape/dtype spec for feature {name!r}")
            tail, dtype = self.expected.get(name, (None, None))
            if tail is None:
                continue
            if len(spec.shape) != 1 + len(tail) or tuple(spec.shape[1:]) != tail or spec.dtype != dtype:
                raise StreamSchemaError(
                    f"{where}: feature {name!r} is {list(spec.shape)} {spec.dtype}, the stream announces "
                    f"[L, {', '.join(map(str, tail))}] {dtype}".replace(", ]", "]")
                )
            lengths.add(spec.shape[0])
        if len(lengths) > 1:
            raise StreamSchemaError(f"{where}: features disagree on the sequence length: {sorted(lengths)}")
        if self.max_length and lengths and max(lengths) > self.max_length:
            raise StreamSchemaError(f"{where} has {max(lengths)} tokens, over the stream's max_length {self.max_length}")

