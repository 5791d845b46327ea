"""FeatureDataModule: prepared features (or a stream) as a LightningDataModule.

``prepare_data`` captures the features when they are missing, so the first
``fit`` on a fresh machine needs no separate step. ``setup`` refuses features
whose manifest disagrees with this run's configuration, naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from specforge_lightning.contracts import FeatureContext, StrategySpec
from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.shards import read_shard_index
from specforge_lightning.data.stores.local import PreparedShardStore
from specforge_lightning.target.prepare import PrepareConfig, manifest_mismatch, prepare, read_manifest
from specforge_lightning.target.zoo import resolve_target

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


class SampleTransform:
    """Per-sample normalisation: keep the strategy's features, truncate, drop unusable samples."""

    def __init__(self, spec: StrategySpec | None, max_length: int | None):
        self.spec = spec
        self.max_length = max_length
        self.skipped = 0

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if self.spec is not None:
            missing = [f for f in self.spec.features if f not in sample]
            if missing:
                raise KeyError(f"sample lacks features {missing} that strategy {self.spec.name!r} needs")
            keep = self.spec.features + tuple(k for k in self.spec.optional_features if k in sample)
            sample = {k: sample[k] for k in keep}
        if self.max_length:
            sample = {k: v[: self.max_length] for k, v in sample.items()}
        mask = sample["loss_mask"].tolist()
        if self.spec is not None and not self.spec.accepts(mask):
            self.skipped += 1
            return None
        return sample


class FeatureDataModule(L.LightningDataModule):
    """Offline features prepared by ``prepare`` (captured on first use if missing)."""

    def __init__(
        self,
        prepare: PrepareConfig | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        max_length: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        prefetch: int = 2,
        auto_prepare: bool = True,
    ):
        super().__init__()
        self.prepare_cfg = prepare or PrepareConfig()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_length = max_length
        self.shuffle = shuffle
        self.seed = seed
        self.prefetch = prefetch
        self.auto_prepare = auto_prepare
        self.manifest: dict[str, Any] | None = None
        self.feature_context: FeatureContext | None = None
        self._train_loader: FeatureDataLoader | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def features_dir(self) -> Path:
        return Path(self.prepare_cfg.output_dir)

    def prepare_data(self) -> None:
        manifest = read_manifest(self.features_dir)
        if manifest is not None and manifest.get("complete"):
            self._check(manifest)
            return
        if not self.auto_prepare:
            raise FileNotFoundError(
                f"no complete prepared features in {self.features_dir}; run "
                "`python -m specforge_lightning prepare` or set data.auto_prepare=true"
            )
        prepare(self.prepare_cfg)

    def _check(self, manifest: dict[str, Any]) -> None:
        wanted = {k: v for k, v in asdict(self.prepare_cfg).items() if k in CONFIG_FIELDS}
        if self.prepare_cfg.layer_ids:
            wanted["layer_ids"] = list(self.prepare_cfg.layer_ids)
        diff = manifest_mismatch(manifest, wanted, CONFIG_FIELDS + ("layer_ids",))
        if diff:
            raise ValueError(f"features in {self.features_dir} do not match this run ({diff})")

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        manifest = read_manifest(self.features_dir)
        if manifest is None or not manifest.get("complete"):
            raise FileNotFoundError(f"{self.features_dir} holds no complete prepared features (manifest.json)")
        self._check(manifest)
        self.manifest = manifest
        self.store = PreparedShardStore(self.features_dir)
        self.refs = {
            split: [ref for rel in info["shards"] for ref in read_shard_index(self.features_dir / rel)]
            for split, info in manifest["splits"].items()
        }
        self.feature_context = FeatureContext(
            target_dir=str(resolve_target(manifest["target"], self.prepare_cfg.cache_dir)),
            target_id=manifest["target"],
            layer_ids=tuple(manifest["layer_ids"]),
            hidden_size=manifest["hidden_size"],
            vocab_size=manifest["vocab_size"],
            draft_vocab_size=manifest["draft_vocab_size"],
            vocab_mapping_path=str(self.features_dir / manifest["vocab_mapping"]),
            capture_dtype=manifest["capture_dtype"],
            max_length=manifest["max_length"],
            manifest=manifest,
        )

    def _strategy_spec(self) -> StrategySpec | None:
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return getattr(module, "strategy_spec", None)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def make_loader(self, split: str, *, batch_size: int, shuffle: bool, drop_last: bool) -> FeatureDataLoader:
        rank, world = self._rank()
        spec = self._strategy_spec()
        return FeatureDataLoader(
            self.store,
            refs=self.refs[split],
            batch_size=batch_size,
            transform=SampleTransform(spec, self.max_length),
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            drop_last=drop_last,
            prefetch=self.prefetch,
            strategy=spec.name if spec else "",
        )

    def sample_features(
        self, num_samples: int, split: str = "train", keys: Sequence[str] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """The first ``num_samples`` samples of ``split``, read straight from the store.

        For data-dependent initialisation before the first step: the same samples on
        every rank, and the train loader's position is left untouched.
        """
        if self.manifest is None:
            self.setup("fit")
        refs = self.refs.get(split) or []
        if not refs:
            raise ValueError(f"{self.features_dir} has no {split!r} samples")
        out = []
        for ref in refs[:num_samples]:
            if keys is not None:  # the store reads only the features the ref names
                ref = replace(ref, feature_keys={k: v for k, v in ref.feature_keys.items() if k in keys})
            tensors, lease = self.store.get(ref)
            self.store.release(lease)
            out.append(tensors)
        return out

    def load_train_state(self, state: dict[str, Any]) -> None:
        """Resume the train loader at ``state`` (a rank-keyed ``FeatureDataLoader.state_dict``) on its next creation."""
        self._pending_state = state

    def train_dataloader(self) -> FeatureDataLoader:
        self._train_loader = self.make_loader("train", batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True)
        if self._pending_state is not None:
            self._train_loader.load_state_dict(self._pending_state)
            self._pending_state = None
        elif getattr(self, "trainer", None) is not None:
            # Lightning never calls set_epoch on this loader; a reloaded loader must not restart at epoch 0.
            self._train_loader.set_epoch(self.trainer.current_epoch)
        return self._train_loader

    def val_dataloader(self) -> FeatureDataLoader | list:
        if not self.refs.get("val"):
            return []
        return self.make_loader("val", batch_size=self.val_batch_size, shuffle=False, drop_last=False)
