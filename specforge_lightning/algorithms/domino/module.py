"""Domino as a LightningModule: the DFlash step with a GRU-corrected head and a decaying base-loss weight.

Everything DFlash does (anchors seeded by step and sample id, global loss
normalisation in ``on_before_optimizer_step``, frozen target embedding/head,
checkpoint metadata) is inherited; see ``specforge_lightning.algorithms.dflash.module``.
λ is computed from ``global_step`` and ``trainer.estimated_stepping_batches``
(0 when the horizon is unknown, as upstream).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from specforge_lightning.algorithms.dflash.loss import block_labels
from specforge_lightning.algorithms.dflash.module import VAL_STEP, BlockAcceptanceMetric, DFlashModule, dflash_args
from specforge_lightning.algorithms.domino.loss import DominoLossOutput, domino_loss, lambda_base
from specforge_lightning.algorithms.domino.model import DominoConfig, DominoDraft
from specforge_lightning.contracts import FeatureContext, StrategySpec


class DominoModule(DFlashModule):
    """Train a Domino draft (upstream defaults: emb 256, GRU 1024, pure prefix 1, λ 1.0 → 0 over half the run).

    Args (beyond DFlash's; the loss is CE, so ``loss_type``/``dpace_alpha`` are not offered):
        emb_dim, gru_hidden_dim: correction head sizes.
        pure_draft_prefix_len: predicted positions that keep the pure DFlash logits.
        shift_label: slot j predicts ``x[a+1+j]`` (every slot scored) instead of ``x[a+j]``.
        lambda_base_start, lambda_base_decay_ratio: λ schedule of ``(1-λ)·CE_final + λ·CE_base``.
    """

    strategy_spec: ClassVar[StrategySpec] = StrategySpec(
        name="domino",
        features=("input_ids", "loss_mask", "aux_hidden_states"),
        min_supervised_run=2,
        layer_preset="spread:5",
        resume_strict_hparams=("block_size", "loss_decay_gamma", "shift_label", "pure_draft_prefix_len"),
    )
    checkpoint_key: ClassVar[str] = "domino"

    def __init__(
        self,
        num_layers: int = 1,
        block_size: int = 16,
        num_anchors: int = 512,
        loss_decay_gamma: float | None = None,
        mask_token_id: int | None = None,
        qk_norm: bool | None = True,
        anchor_seed: int = 0,
        objective_chunk_rows: int = 2048,
        emb_dim: int = 256,
        gru_hidden_dim: int = 1024,
        pure_draft_prefix_len: int = 1,
        shift_label: bool = True,
        lambda_base_start: float = 1.0,
        lambda_base_decay_ratio: float = 0.5,
        lr: float = 6e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.04,
        min_lr_ratio: float = 0.0,
        anneal_by_time: bool = False,
        frozen_dtype: str | None = None,
    ) -> None:
        super().__init__(**dflash_args(locals()))
        self.train_base = BlockAcceptanceMetric(self.num_positions, dist_sync_on_step=True)
        self.val_base = BlockAcceptanceMetric(self.num_positions)

    @property
    def label_shift(self) -> int:  # type: ignore[override]
        return 1 if self.hparams.shift_label else 0

    @staticmethod
    def config_class() -> type[DominoConfig]:
        return DominoConfig

    def make_config(self, target_cfg: Mapping[str, Any], context: FeatureContext) -> DominoConfig:
        hp = self.hparams
        base = super().make_config(target_cfg, context)
        return DominoConfig(
            **base.to_dict(),
            emb_dim=hp.emb_dim,
            gru_hidden_dim=hp.gru_hidden_dim,
            pure_draft_prefix_len=hp.pure_draft_prefix_len,
            shift_label=hp.shift_label,
        )

    def make_draft(self, config: DominoConfig) -> DominoDraft:
        return DominoDraft(config)

    def current_lambda(self) -> float:
        trainer = self._trainer
        total = None
        if trainer is not None:
            try:
                total = float(trainer.estimated_stepping_batches)
            except Exception:  # no loop attached yet (e.g. a bare module in a test)
                total = None
        if total is not None and not math.isfinite(total):
            total = None
        hp = self.hparams
        return lambda_base(self.global_step, total, hp.lambda_base_start, hp.lambda_base_decay_ratio)

    def compute_loss(self, batch: Any, step: int | None = None) -> DominoLossOutput:  # type: ignore[override]
        hp = self.hparams
        input_ids, loss_mask, anchors, keep, hidden = self.draft_blocks(batch, step)
        shift = self.label_shift
        labels, w = block_labels(input_ids, loss_mask, anchors, keep, hp.block_size, shift=shift)
        P = w.shape[-1]
        S = input_ids.shape[1]
        prev_pos = (anchors[..., None] + torch.arange(P, device=anchors.device)).clamp(max=S - 1)
        prev = input_ids.gather(1, prev_pos.reshape(len(input_ids), -1)).view(prev_pos.shape)
        gru, _ = self.draft.gru_states(prev)
        return domino_loss(
            hidden[:, :, 1 - shift :], gru, labels, w, keep, self.draft.base_and_final_logits,
            lam=self.current_lambda(), gamma=hp.loss_decay_gamma, prefix_len=hp.pure_draft_prefix_len,
            chunk=hp.objective_chunk_rows,
        )

    def _log_train(self, out: DominoLossOutput, bs: int) -> None:  # type: ignore[override]
        final = self.train_acceptance(out.counts, out.final_numerator, out.denominator)
        base = self.train_base(out.base_counts, out.base_numerator, out.denominator)
        lam = out.lambda_base
        self.log("train/loss", ((1 - lam) * final["loss"] + lam * base["loss"]).float(), prog_bar=True, batch_size=bs)
        self.log("train/final_loss", final["loss"].float(), batch_size=bs)
        self.log("train/base_loss", base["loss"].float(), batch_size=bs)
        self.log("train/lambda_base", float(lam), batch_size=bs)
        self.log("train/acceptance_length", final["acceptance_length"].float(), prog_bar=True, batch_size=bs)
        self.log("train/base_acceptance_length", base["acceptance_length"].float(), batch_size=bs)
        for k in range(self.num_positions):
            self.log(f"train/acc_{k}", final["acc_k"][k].float(), batch_size=bs)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.train_base.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.compute_loss(batch, step=VAL_STEP)
        self.val_acceptance.update(out.counts, out.final_numerator, out.denominator)
        self.val_base.update(out.base_counts, out.base_numerator, out.denominator)

    def on_validation_epoch_end(self) -> None:
        base = self.val_base.compute()
        self.val_base.reset()
        self.log("val/base_loss", base["loss"].float(), sync_dist=True)
        self.log("val/base_acceptance_length", base["acceptance_length"].float(), sync_dist=True)
        self.log("val/base_acc", base["acc"].float(), sync_dist=True)
        super().on_validation_epoch_end()  # val/loss here is the final head's CE
