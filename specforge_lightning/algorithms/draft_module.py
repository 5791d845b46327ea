"""The LightningModule base of the drafts: built lazily from a FeatureContext, checkpointed with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
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


class TokenNormalizedDraftModule(LazyDraftModule):
    """A draft whose step loss is ``Σ numerators / Σ denominators`` over all ranks and micro-batches.

    ``training_step`` returns its micro-batch's numerator and hands its denominator to
    ``add_denominator``; ``on_before_optimizer_step`` (after the step's last backward, after
    AMP unscaling, before clipping) all-reduces the running sum to ``D`` and multiplies every
    gradient by ``W·A / D`` (W = world size, whose mean DDP/FSDP already took; A =
    accumulate_grad_batches, which Lightning already divided the loss by). The gradient is
    then the same however the tokens are spread across ranks and micro-batches.

    ``train_acceptance`` / ``val_acceptance`` are sum-reduced metrics whose ``compute()`` gives
    ``loss``, ``acceptance_length``, ``acc`` and ``acc_k``; they are logged here the same way.
    """

    denominator_floor: ClassVar[float] = 1e-12  # the smallest D divided by (no tokens: the gradient stays 0)
    train_acceptance: Any
    val_acceptance: Any

    def __init__(self) -> None:
        super().__init__()
        self._den_accum = torch.zeros((), dtype=torch.float64)

    def add_denominator(self, denominator: torch.Tensor) -> None:
        """Count a micro-batch's denominator towards its optimizer step's ``D``."""
        self._den_accum = self._den_accum.to(denominator.device) + denominator.detach().double()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trainer = self.trainer
        self.normalize_gradients(
            optimizer, trainer.world_size, trainer.accumulate_grad_batches,
            lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
        )

    def normalize_gradients(
        self, optimizer: torch.optim.Optimizer, world_size: int, accumulate: int,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Scale the step's gradients by ``W·A / D`` (class docstring), once after its last backward.

        The one home of the rescale: the Trainer reaches it through ``on_before_optimizer_step``, a
        hand-written loop calls it directly; ``reduce_sum`` sums a tensor over all ranks.
        """
        total = reduce_sum(self._den_accum.to(self.device))
        scale = world_size * accumulate / total.clamp_min(self.denominator_floor)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self._den_accum = torch.zeros((), dtype=torch.float64, device=self.device)

    def log_train_pooled(self, pooled: dict[str, torch.Tensor], bs: int) -> None:
        """Log a step's pooled loss, acceptance length and per-position accuracies."""
        self.log("train/loss", pooled["loss"].float(), prog_bar=True, batch_size=bs)
        self.log("train/acceptance_length", pooled["acceptance_length"].float(), prog_bar=True, batch_size=bs)
        for k, a in enumerate(pooled["acc_k"]):
            self.log(f"train/acc_{k}", a.float(), batch_size=bs)

    def on_train_epoch_start(self) -> None:
        self.train_acceptance.reset()

    def on_validation_epoch_end(self) -> None:
        result = self.val_acceptance.compute()  # states are summed across ranks first
        self.val_acceptance.reset()
        self.log("val/loss", result["loss"].float(), sync_dist=True)
        self.log("val/acceptance_length", result["acceptance_length"].float(), prog_bar=True, sync_dist=True)
        self.log("val/acc", result["acc"].float(), sync_dist=True)
        for k, a in enumerate(result["acc_k"]):
            self.log(f"val/acc_{k}", a.float(), sync_dist=True)
