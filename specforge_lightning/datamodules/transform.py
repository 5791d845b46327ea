"""Per-sample normalisation between the store and the collate, as the algorithm's StrategySpec asks."""

from __future__ import annotations

import torch

from specforge_lightning.contracts import StrategySpec


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
