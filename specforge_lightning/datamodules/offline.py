"""FeatureDataModule: prepared features as a LightningDataModule.

``prepare_data`` captures the features when they are missing, so the first
``fit`` on a fresh machine needs no separate step. ``setup`` refuses features
whose manifest disagrees with this run's configuration or algorithm, naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from specforge_lightning.contracts import FeatureContext, StrategySpec
from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.manifest import REPAIR_HINT, MissingFeaturesError, feature_context, read_manifest
from specforge_lightning.data.stores.local import PreparedShardStore
from specforge_lightning.data.stores.shards import damaged_shards, read_shard_index
from specforge_lightning.data.vocab import check_vocab_file
from specforge_lightning.datamodules.checks import check_run, trainer_rank, trainer_strategy_spec
from specforge_lightning.datamodules.transform import SampleTransform
from specforge_lightning.target.prepare import PrepareConfig, prepare
from specforge_lightning.target.zoo import resolve_target


TARGET_FIX = "prepare them again into another output_dir (or restore the target's files)"


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
        self._checked: dict[str, Any] | None = None

    @property
    def features_dir(self) -> Path:
        return Path(self.prepare_cfg.output_dir)

    def prepare_data(self) -> None:
        manifest = read_manifest(self.features_dir)
        if manifest is not None and manifest.get("complete"):
            self._check(manifest)
            return
        if not self.auto_prepare:
            raise MissingFeaturesError(
                f"no complete prepared features in {self.features_dir}; run "
                "`python -m specforge_lightning prepare` or set data.auto_prepare=true"
            )
        prepare(self.prepare_cfg, self._strategy_spec())

    def _check(self, manifest: dict[str, Any]) -> None:
        if manifest == self._checked:  # prepare_data then setup: the target is hashed once
            return
        target_dir = resolve_target(manifest["target"], self.prepare_cfg.cache_dir)
        where = f"features in {self.features_dir}"
        check_run(manifest, self.prepare_cfg, self._strategy_spec(), where, target_dir, TARGET_FIX)
        self._checked = manifest

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        manifest = read_manifest(self.features_dir)
        if manifest is None or not manifest.get("complete"):
            raise MissingFeaturesError(f"{self.features_dir} holds no complete prepared features (manifest.json)")
        self._check(manifest)
        rels = [rel for info in manifest["splits"].values() for rel in info["shards"]]
        damaged = damaged_shards(self.features_dir, rels)
        if damaged:
            raise MissingFeaturesError(f"{self.features_dir} has damaged shards {damaged}; {REPAIR_HINT}")
        check_vocab_file(self.features_dir / manifest["vocab_mapping"])
        self.manifest = manifest
        self.store = PreparedShardStore(self.features_dir)
        self.refs = {
            split: [ref for rel in info["shards"] for ref in read_shard_index(self.features_dir / rel)]
            for split, info in manifest["splits"].items()
        }
        target_dir = resolve_target(manifest["target"], self.prepare_cfg.cache_dir)
        self.feature_context = feature_context(manifest, self.features_dir, target_dir)

    def _strategy_spec(self) -> StrategySpec | None:
        return trainer_strategy_spec(self.trainer)

    def _rank(self) -> tuple[int, int]:
        return trainer_rank(self.trainer)

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
        elif self.trainer is not None:
            # Lightning never calls set_epoch on this loader; a reloaded loader must not restart at epoch 0.
            self._train_loader.set_epoch(self.trainer.current_epoch)
        return self._train_loader

    def val_dataloader(self) -> FeatureDataLoader | list:
        if not self.refs.get("val"):
            return []
        return self.make_loader("val", batch_size=self.val_batch_size, shuffle=False, drop_last=False)
