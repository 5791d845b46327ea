"""DSpark as a LightningModule: the DFlash step with Markov-biased logits, the L1 + confidence terms and their metrics.

Everything DFlash does is inherited (``algorithms.dflash.module``): anchors seeded by
(anchor_seed, step, sample id), the frozen target embedding and head, checkpoint
metadata, and the global normalisation in ``on_before_optimizer_step``: ``training_step``
returns the numerator ``Σ (α_ce·CE + α_l1·L1 + α_conf·BCE)·w`` and adds ``Σ w`` to the
running denominator, which is all-reduced over ranks and accumulation micro-steps before
every gradient is scaled. The target's final post-norm hidden state (``last_hidden_state``)
is a declared feature: it gives the teacher distribution of the L1 term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torchmetrics import Metric

from specforge_lightning.algorithms.dflash.loss import block_labels
from specforge_lightning.algorithms.dflash.module import VAL_STEP, DFlashModule, dflash_args
from specforge_lightning.algorithms.dspark.loss import TOKEN_SUMS, WEIGHTED_SUMS, DSparkLossOutput, dspark_loss
from specforge_lightning.algorithms.dspark.model import DSparkConfig, DSparkDraft
from specforge_lightning.contracts import FeatureContext, StrategySpec


class DSparkMetric(Metric):
    """DSpark's ratio metrics, kept as sums (reduced across ranks) until ``compute``.

    ``compute()`` → ``ce_loss``/``l1_loss``/``confidence_loss`` (weighted means over Σw),
    ``confidence_abs_error``, ``teacher_agreement``, ``teacher_top1_prob``, ``draft_top1_prob``
    (means over scored tokens), ``tau_probabilistic`` (mean over real blocks of
    ``1 + Σ_j Π_{i≤j} accept_i``) and ``ce_position`` (P,) (mean CE per slot, undecayed).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_positions: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in (*WEIGHTED_SUMS, *TOKEN_SUMS, "tau", "weight", "tokens", "blocks"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("ce_position", "position_count"):
            self.add_state(name, default=torch.zeros(num_positions, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, out: DSparkLossOutput) -> None:
        for name in (*WEIGHTED_SUMS, *TOKEN_SUMS, "tau", "ce_position"):
            setattr(self, name, getattr(self, name) + out.sums[name].detach().double())
        self.weight += out.denominator.detach().double()
        self.tokens += out.tokens.detach().double()
        self.blocks += out.counts.blocks.detach().double()
        self.position_count += out.counts.total.detach().double()

    def compute(self) -> dict[str, torch.Tensor]:
        result = {name: getattr(self, name) / self.weight.clamp_min(1e-12) for name in WEIGHTED_SUMS}
        result.update({name: getattr(self, name) / self.tokens.clamp_min(1.0) for name in TOKEN_SUMS})
        result["tau_probabilistic"] = self.tau / self.blocks.clamp_min(1.0)
        result["ce_position"] = self.ce_position / self.position_count.clamp_min(1.0)
        return result


class DSparkModule(DFlashModule):
    """Train a DSpark draft (upstream: block 7, vanilla Markov rank 256, confidence head on Markov features,
    γ 4.0, α_ce 0.1 / α_l1 0.9 / α_conf 1.0, 512 anchors, lr 6e-4).

    Args (beyond DFlash's; the loss is DSpark's, so ``loss_type``/``dpace_alpha`` are not offered):
        markov_rank: rank of the Markov logit bias (0 = none: pure DFlash logits).
        markov_head_type: ``vanilla``, ``gated`` or ``rnn`` (see ``algorithms.dspark.heads``).
        enable_confidence_head: the acceptance predictor; None = on when ``alpha_conf > 0``.
        confidence_head_with_markov: feed it ``W1[prev]`` too; None = when ``markov_rank > 0``.
        alpha_ce, alpha_l1, alpha_conf: weights of the CE, L1(p_D, p_T) and confidence BCE terms.
        loss_decay_gamma: ``exp(-j/γ)`` weight of slot j (None = off).
    """

    strategy_spec: ClassVar[StrategySpec] = StrategySpec(
        name="dspark",
        features=("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state"),
        min_supervised_run=2,
        layer_preset="spread:5",
        resume_strict_hparams=("block_size", "loss_decay_gamma", "alpha_ce", "alpha_l1", "alpha_conf"),
    )
    checkpoint_key: ClassVar[str] = "dspark"
    label_shift: ClassVar[int] = 1

    def __init__(
        self,
        num_layers: int = 1,
        block_size: int = 7,
        num_anchors: int = 512,
        loss_decay_gamma: float | None = 4.0,
        mask_token_id: int | None = None,
        qk_norm: bool | None = None,
        anchor_seed: int = 0,
        objective_chunk_rows: int = 2048,
        markov_rank: int = 256,
        markov_head_type: str = "vanilla",
        enable_confidence_head: bool | None = None,
        confidence_head_with_markov: bool | None = None,
        alpha_ce: float = 0.1,
        alpha_l1: float = 0.9,
        alpha_conf: float = 1.0,
        lr: float = 6e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.04,
        min_lr_ratio: float = 0.0,
        anneal_by_time: bool = False,
        frozen_dtype: str | None = None,
    ) -> None:
        super().__init__(**dflash_args(locals()))
        if min(alpha_ce, alpha_l1, alpha_conf) < 0:
            raise ValueError(f"model.init_args.alpha_*: loss weights must be >= 0, got {alpha_ce}, {alpha_l1}, {alpha_conf}")
        if enable_confidence_head is False and alpha_conf > 0:
            raise ValueError("model.init_args.alpha_conf > 0 trains a confidence head: set enable_confidence_head: true "
                             "(or leave it null), or alpha_conf: 0")
        self.train_dspark = DSparkMetric(self.num_positions, dist_sync_on_step=True)
        self.val_dspark = DSparkMetric(self.num_positions)

    @staticmethod
    def config_class() -> type[DSparkConfig]:
        return DSparkConfig

    def make_config(self, target_cfg: Mapping[str, Any], context: FeatureContext) -> DSparkConfig:
        hp = self.hparams
        base = super().make_config(target_cfg, context)
        confidence = hp.alpha_conf > 0 if hp.enable_confidence_head is None else bool(hp.enable_confidence_head)
        with_markov = hp.markov_rank > 0 if hp.confidence_head_with_markov is None else bool(hp.confidence_head_with_markov)
        if confidence and with_markov and hp.markov_rank == 0:
            raise ValueError("model.init_args.confidence_head_with_markov needs markov_rank > 0: raise markov_rank "
                             "or set confidence_head_with_markov: false")
        return DSparkConfig(
            **base.to_dict(), markov_rank=int(hp.markov_rank), markov_head_type=str(hp.markov_head_type),
            enable_confidence_head=confidence, confidence_head_with_markov=with_markov and confidence,
        )

    def make_draft(self, config: DSparkConfig) -> DSparkDraft:
        return DSparkDraft(config)

    # ------------------------------------------------------------------ the step

    def compute_loss(self, batch: Any, step: int | None = None) -> DSparkLossOutput:  # type: ignore[override]
        hp = self.hparams
        input_ids, loss_mask, anchors, keep, hidden = self.draft_blocks(batch, step)
        labels, w = block_labels(input_ids, loss_mask, anchors, keep, hp.block_size, shift=1)
        B, S = input_ids.shape
        prev_pos = (anchors[..., None] + torch.arange(hp.block_size, device=anchors.device)).clamp(max=S - 1)
        flat = prev_pos.reshape(B, -1)
        prev = input_ids.gather(1, flat).view(prev_pos.shape)
        last = self._tensors(batch)["last_hidden_state"]
        teacher = last.gather(1, flat[..., None].expand(-1, -1, last.shape[-1])).view(*prev_pos.shape, -1)
        return dspark_loss(
            self.draft, hidden, labels, w, keep, prev, teacher, alpha_ce=hp.alpha_ce, alpha_l1=hp.alpha_l1,
            alpha_conf=hp.alpha_conf, gamma=hp.loss_decay_gamma, chunk=hp.objective_chunk_rows,
        )

    def _log_train(self, out: DSparkLossOutput, bs: int) -> None:  # type: ignore[override]
        pooled = self.train_acceptance(out.counts, out.numerator, out.denominator)  # this step, summed over ranks
        extra = self.train_dspark(out)
        self.log("train/loss", pooled["loss"].float(), prog_bar=True, batch_size=bs)
        self.log("train/acceptance_length", pooled["acceptance_length"].float(), prog_bar=True, batch_size=bs)
        self.log("train/acc", pooled["acc"].float(), batch_size=bs)
        self._log_extra("train", extra, batch_size=bs)
        for k in range(self.num_positions):
            self.log(f"train/acc_{k}", pooled["acc_k"][k].float(), batch_size=bs)

    def _log_extra(self, stage: str, extra: Mapping[str, torch.Tensor], **kwargs: Any) -> None:
        for name, value in extra.items():
            if name == "ce_position":
                for k, v in enumerate(value):
                    self.log(f"{stage}/ce_position_{k}", v.float(), **kwargs)
            else:
                self.log(f"{stage}/{name}", value.float(), **kwargs)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.train_dspark.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.compute_loss(batch, step=VAL_STEP)
        self.val_acceptance.update(out.counts, out.numerator, out.denominator)
        self.val_dspark.update(out)

    def on_validation_epoch_end(self) -> None:
        extra = self.val_dspark.compute()
        self.val_dspark.reset()
        self._log_extra("val", extra, sync_dist=True)
        super().on_validation_epoch_end()


__all__ = ["DSparkMetric", "DSparkModule"]
