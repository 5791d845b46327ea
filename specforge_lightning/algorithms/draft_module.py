"""The LightningModule base of the drafts: built lazily from a FeatureContext, checkpointed with it."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from specforge_lightning.algorithms.optim import build_adamw_cosine, time_budget_progress
from specforge_lightning.contracts import FeatureContext, StrategySpec

# Top-level checkpoint entry naming the algorithm and its module's import path (registry.algorithm_of_checkpoint).
ALGORITHM_KEY = "specforge_algorithm"


class LazyDraftModule(L.LightningModule):
    """A LightningModule whose draft is built from a ``FeatureContext`` when first needed.

    ``setup`` builds it from ``trainer.datamodule.feature_context``; a checkpoint
    stores the context and the draft config under ``checkpoint_key`` so that
    ``on_load_checkpoint`` rebuilds the architecture before Lightning loads the
    weights (``load_from_checkpoint`` needs no datamodule). Subclasses provide
    ``build(context)``, ``config_class`` and ``restore(context, config)``, and hparams
    ``lr``, ``weight_decay``, ``betas``, ``warmup_ratio``, ``min_lr_ratio`` for the
    optimizer (AdamW over the draft, warmup + cosine per optimizer step), and optionally
    ``anneal_by_time``: the cosine then also follows the spent share of ``trainer.max_time``
    (whichever of steps and time is further along), so that a time-capped run ends at the
    minimum LR on a slow machine and trains to the budget on a fast one (with ``max_steps``
    as a cap). The LR then depends on wall time: a resumed run is not bit-identical.
    """

    strategy_spec: ClassVar[StrategySpec]
    checkpoint_key: ClassVar[str]
    draft: nn.Module | None
    draft_config: Any
    context: FeatureContext | None

    def build(self, context: FeatureContext) -> None:
        raise NotImplementedError

    @staticmethod
    def config_class() -> type:
        raise NotImplementedError

    def restore(self, context: FeatureContext, config: Any) -> None:
        """Rebuild the draft of a checkpoint (no fresh initialisation: the weights follow)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.draft is not None:
            return
        context = getattr(getattr(self.trainer, "datamodule", None), "feature_context", None)
        if context is None:
            raise RuntimeError(f"{type(self).__name__} needs trainer.datamodule.feature_context (or build(context))")
        self.build(context)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.draft is None:
            raise RuntimeError(f"cannot checkpoint a {type(self).__name__} that was never built")
        cls = type(self)
        checkpoint[ALGORITHM_KEY] = {"name": self.strategy_spec.name, "module": f"{cls.__module__}.{cls.__qualname__}"}
        checkpoint[self.checkpoint_key] = {
            "format": 1,
            "feature_context": self.context.to_dict(),
            "draft_config": self.draft_config.to_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint[self.checkpoint_key]
        config = self.config_class().from_dict(meta["draft_config"])
        if self.draft is None:
            self.restore(FeatureContext.from_dict(meta["feature_context"]), config)
        elif self.draft_config != config:
            raise ValueError(f"checkpoint draft config {config} differs from the built draft {self.draft_config}")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return build_adamw_cosine(
            self.draft.parameters(),
            lr=hp.lr,
            total_steps=self.trainer.estimated_stepping_batches,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            warmup_ratio=hp.warmup_ratio,
            min_lr_ratio=hp.min_lr_ratio,
            time_progress=time_budget_progress(self.trainer) if hp.get("anneal_by_time") else None,
            fused=self._fusable(),
        )

    def _fusable(self) -> bool:
        """One optimizer pass over all tensors: on CPU ~5 instead of ~27 ms per step for the
        quickstart's EAGLE3 draft. Only where ``configure_gradient_clipping`` may clip directly:
        whole (not sharded) parameters, and no fp16 loss scaler that must unscale first."""
        whole = isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
        return whole and getattr(self.trainer.precision_plugin, "scaler", None) is None

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, on account of
        # fp16 loss scaling; without a scaler (bf16, fp32) the gradients are true values already.
        # So the check is skipped and the plugin's own clipping helpers are called directly.
        if not gradient_clip_val or not optimizer.defaults.get("fused"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        plugin = self.trainer.precision_plugin
        if gradient_clip_algorithm == "value":
            plugin.clip_grad_by_value(optimizer, gradient_clip_val)
        else:
            plugin.clip_grad_by_norm(optimizer, gradient_clip_val)
