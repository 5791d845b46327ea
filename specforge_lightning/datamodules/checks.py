"""What the datamodules check before they train: the run's algorithm and config against the features' manifest.

Shared by FeatureDataModule (prepared folders) and StreamDataModule (streams), so
both refuse the same mismatches with the same messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L

from specforge_lightning.contracts import StrategySpec
from specforge_lightning.data.manifest import FeatureMismatchError, captured_features, check_identity
from specforge_lightning.target.identity import check_target
from specforge_lightning.target.layers import preset_or_spec, resolve_layer_ids
from specforge_lightning.target.prepare_config import PrepareConfig

# Manifest fields a run can check from its config alone (no target load needed).
CONFIG_FIELDS = (
    "target",
    "corpus",
    "skip_samples",
    "num_samples",
    "num_val_samples",
    "max_length",
    "max_messages",
    "train_only_last_turn",
    "capture_dtype",
    "draft_vocab_size",
    "regenerate",
    "regenerate_samples",
)
FIX = "use another output_dir or set data.init_args.prepare.layer_preset"


def trainer_strategy_spec(trainer: L.Trainer | None) -> StrategySpec | None:
    """The attached algorithm's declared StrategySpec; None only without a trainer (unit tests)."""
    if trainer is None:
        return None
    module = trainer.lightning_module
    if module is None:
        raise RuntimeError(
            "the datamodule needs the trainer's LightningModule (its strategy_spec): call trainer.fit(model, datamodule)"
        )
    try:
        return module.strategy_spec
    except AttributeError:
        raise TypeError(
            f"{type(module).__name__} declares no strategy_spec: every algorithm module sets the class attribute "
            "`strategy_spec: ClassVar[StrategySpec]` (see specforge_lightning.contracts.StrategySpec)"
        ) from None


def trainer_rank(trainer: L.Trainer | None) -> tuple[int, int]:
    """(global rank, world size); one rank without a trainer."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def check_features(
    manifest: Mapping[str, Any], cfg: PrepareConfig | None, spec: StrategySpec | None, where: str
) -> None:
    """Refuse features that this run's config (``cfg``, None: not checked) or algorithm (``spec``) cannot use.

    ``where`` names the features in the message (e.g. ``features in outputs/x``).
    """
    if cfg is not None:
        # ``auto`` compares as what it resolves to on this machine, as prepare recorded it.
        wanted = {k: v for k, v in asdict(cfg.resolved()).items() if k in CONFIG_FIELDS}
        check_identity(manifest, wanted, CONFIG_FIELDS, f"{where} do not match this run ({{diff}})")
        _check_layer_ids(manifest, cfg, spec, where)
    if spec is None:
        return
    layers = list(manifest.get("layer_ids") or [])
    if spec.layer_count is not None and len(layers) != spec.layer_count:
        raise FeatureMismatchError(
            f"{where} do not match this run (layer_count: the features hold {len(layers)} layers {layers}, "
            f"algorithm {spec.name!r} takes {spec.layer_count}); {FIX}"
        )
    missing = [name for name in spec.features if name not in captured_features(manifest)]
    if missing:
        raise FeatureMismatchError(
            f"{where} do not match this run (features: captured {list(captured_features(manifest))}, "
            f"algorithm {spec.name!r} needs {missing} as well); use another output_dir"
        )


def check_run(
    manifest: Mapping[str, Any],
    cfg: PrepareConfig | None,
    spec: StrategySpec | None,
    where: str,
    target_dir: str | Path,
    fix: str,
) -> None:
    """Everything a trainer checks before it uses features: ``check_features`` and the target it loads.

    The target folder must hold the weights, tokenizer and chat template the features were
    captured from (``target.identity.check_target``; ``fix`` ends that message).
    """
    check_features(manifest, cfg, spec, where)
    check_target(manifest, target_dir, where, fix)


def _check_layer_ids(manifest: Mapping[str, Any], cfg: PrepareConfig, spec: StrategySpec | None, where: str) -> None:
    if cfg.layer_ids:
        wanted, source = list(cfg.layer_ids), "data.init_args.prepare.layer_ids"
    elif (cfg.layer_preset or spec is not None) and "num_layers" in manifest:
        preset = preset_or_spec(cfg.layer_preset, spec)
        source = f"layer_preset {preset!r}" + ("" if cfg.layer_preset else f" (algorithm {spec.name!r}'s preset)")
        wanted = resolve_layer_ids(preset, int(manifest["num_layers"]))
    else:  # no trainer and no preset: nothing to compare
        return
    if list(manifest.get("layer_ids") or []) != wanted:
        raise FeatureMismatchError(
            f"{where} do not match this run (layer_ids: prepared {manifest.get('layer_ids')!r}, "
            f"requested {wanted!r} from {source}); {FIX}"
        )
