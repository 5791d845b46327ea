"""P-EAGLE as a LightningModule: COD-sampled elements, one parallel draft forward, the soft-CE loss.

Global loss normalisation, as DFlash (``TokenNormalizedDraftModule``): ``training_step``
returns the numerator of its micro-batch and counts its denominator (elements carrying loss),
so the step's gradient is ``∇ Σ numerators / Σ denominators`` whatever the batch size, the
micro-batching or the number of ranks (upstream trains batch 1 only).

COD elements are drawn per sample from ``(cod_seed, global_step, sample id)``, so a resumed
run draws what an uninterrupted one draws, on any world size. Validation uses step -1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from specforge_lightning.algorithms.dflash.loss import anchor_seed
from specforge_lightning.algorithms.dflash.module import resolve_mask_token_id
from specforge_lightning.algorithms.draft_module import TokenNormalizedDraftModule
from specforge_lightning.algorithms.eagle3.loss import compute_teacher
from specforge_lightning.algorithms.metrics import AcceptanceMetric
from specforge_lightning.algorithms.peagle.loss import PEagleLossOutput, peagle_loss
from specforge_lightning.algorithms.peagle.model import PEagleConfig, PEagleDraft
from specforge_lightning.algorithms.peagle.sampling import document_ids, sample_elements, supervised_mask
from specforge_lightning.algorithms.target_weights import (
    EMBEDDING,
    load_frozen_head,
    load_vocab_mapping,
    read_target_config,
)
from specforge_lightning.contracts import FeatureContext, StrategySpec

CHECKPOINT_KEY = "peagle"
VAL_STEP = -1


class DepthMetric(AcceptanceMetric):
    """Per-depth counts plus the loss's numerator and denominator, all sum-reduced across ranks first."""

    def __init__(self, num_steps: int, **kwargs: Any) -> None:
        super().__init__(num_steps, **kwargs)
        self.add_state("loss_num", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("loss_den", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, out: PEagleLossOutput) -> None:  # type: ignore[override]
        super().update(out.correct, out.total)
        self.loss_num += out.numerator.detach().double()
        self.loss_den += out.denominator.detach().double()

    def compute(self) -> dict[str, torch.Tensor]:
        return {**super().compute(), "loss": self.loss_num / self.loss_den.clamp_min(1.0)}


class PEagleModule(TokenNormalizedDraftModule):
    """Train a P-EAGLE draft (upstream defaults: 4 layers, 8 depths, ratio 0.8, min 0.2, lr 1e-4).

    Args:
        num_layers: draft decoder layers (the first EAGLE3-style, the others standard).
        num_depths: tokens one draft forward proposes; COD depths 0..num_depths-1.
        down_sample_ratio, down_sample_ratio_min: depth d keeps ``max(ratio^d, min)`` of the chains.
        cod_seed: seed of the COD draws (with the step and the sample id).
        mask_token_id: MASK id; None resolves it from the target's tokenizer (reference §4.7).
        teacher_chunk_size: rows of full-vocab teacher logits computed at once (None: all).
        lr, weight_decay, betas, warmup_ratio, min_lr_ratio: AdamW + warmup/cosine per optimizer step.
        anneal_by_time: the cosine also follows the spent share of ``trainer.max_time``.
        frozen_dtype: storage dtype of the frozen teacher head (None: as in the target files).
    """

    strategy_spec: ClassVar[StrategySpec] = StrategySpec(
        name="peagle",
        features=("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state"),
        optional_features=("target_top1",),
        min_supervised_run=1,
        layer_preset="eagle3",
        layer_count=3,
        resume_strict_hparams=("num_depths", "down_sample_ratio", "down_sample_ratio_min", "cod_seed"),
    )
    checkpoint_key: ClassVar[str] = CHECKPOINT_KEY
    denominator_floor: ClassVar[float] = 1.0  # D counts whole elements

    def __init__(
        self,
        num_layers: int = 4,
        num_depths: int = 8,
        down_sample_ratio: float = 0.8,
        down_sample_ratio_min: float = 0.2,
        cod_seed: int = 0,
        mask_token_id: int | None = None,
        teacher_chunk_size: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.015,
        min_lr_ratio: float = 0.0,
        anneal_by_time: bool = False,
        frozen_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if num_depths < 1 or num_layers < 1:
            raise ValueError(f"num_depths and num_layers must be >= 1, got {num_depths} and {num_layers}")
        if not (0.0 < down_sample_ratio <= 1.0 and 0.0 <= down_sample_ratio_min <= 1.0):
            raise ValueError("down_sample_ratio must lie in (0, 1] and down_sample_ratio_min in [0, 1]")
        self.save_hyperparameters()
        self.draft: PEagleDraft | None = None
        self.draft_config: PEagleConfig | None = None
        self.context: FeatureContext | None = None
        self.register_buffer("teacher_head", None, persistent=False)
        self.train_acceptance = DepthMetric(num_depths, dist_sync_on_step=True)
        self.val_acceptance = DepthMetric(num_depths)

    # ------------------------------------------------------------------ building

    def build(self, context: FeatureContext) -> None:
        """A fresh draft: geometry, embedding and teacher head from the target, the vocab mapping from the features."""
        hp = self.hparams
        target_cfg = read_target_config(context.target_dir)
        mask_id = resolve_mask_token_id(context.target_dir, int(target_cfg["vocab_size"]), hp.mask_token_id)
        config = PEagleConfig.from_target_config(
            target_cfg, context.draft_vocab_size, context.layer_ids, mask_id, hp.num_layers, hp.num_depths
        )
        if config.target_hidden_size != context.hidden_size or config.vocab_size != context.vocab_size:
            raise ValueError(
                f"feature context (hidden {context.hidden_size}, vocab {context.vocab_size}) does not match "
                f"the target config in {context.target_dir} ({config.target_hidden_size}, {config.vocab_size})"
            )
        self._build(context, config, target_cfg, fresh=True)

    def _build(self, context: FeatureContext, config: PEagleConfig, target_cfg: Mapping[str, Any], fresh: bool) -> None:
        draft = PEagleDraft(config)
        tensors, head_name = load_frozen_head(context.target_dir, target_cfg, self.hparams.frozen_dtype)
        if fresh:  # a restored checkpoint carries its trained embedding and mapping itself
            with torch.no_grad():
                draft.embed_tokens.weight.copy_(tensors[EMBEDDING].float())
            draft.set_vocab_mapping(
                *load_vocab_mapping(context.vocab_mapping_path, config.vocab_size, config.draft_vocab_size)
            )
        self.teacher_head = tensors[head_name].to(self.device)
        self.draft = draft.to(self.device)
        self._ddp_params_and_buffers_to_ignore = ["teacher_head"]
        self.draft_config, self.context = config, context

    @staticmethod
    def config_class() -> type[PEagleConfig]:
        return PEagleConfig

    def restore(self, context: FeatureContext, config: PEagleConfig) -> None:
        self._build(context, config, read_target_config(context.target_dir), fresh=False)

    # ------------------------------------------------------------------ the step

    @staticmethod
    def _tensors(batch: Any) -> dict[str, torch.Tensor]:
        return batch.tensors if hasattr(batch, "tensors") else batch

    def compute_loss(self, batch: Any, step: int | None = None) -> PEagleLossOutput:
        """Loss terms and per-depth counts for a ``TrainBatch`` (or its tensor dict); ``step`` seeds the COD draws."""
        hp = self.hparams
        t = self._tensors(batch)
        input_ids = t["input_ids"]
        attention_mask = t.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        docs = document_ids(attention_mask, t.get("document_ids"))
        supervised = supervised_mask(t["loss_mask"], docs)
        teacher = compute_teacher(
            t["last_hidden_state"], self.teacher_head, self.draft.t2d, supervised, hp.teacher_chunk_size,
            target_top1=t.get("target_top1"),
        )
        step = self.global_step if step is None else step
        ids = list(getattr(batch, "sample_ids", None) or [f"#{i}" for i in range(input_ids.shape[0])])
        seeds = [anchor_seed(hp.cod_seed, step, sid) for sid in ids]
        elements = sample_elements(supervised, docs, seeds, hp.num_depths, hp.down_sample_ratio, hp.down_sample_ratio_min)
        hidden = self.draft(input_ids, t["aux_hidden_states"], elements)
        return peagle_loss(hidden, elements, teacher, self.draft.d2t, self.draft.compute_logits, hp.num_depths)

    def forward(self, batch: Any) -> PEagleLossOutput:
        return self.compute_loss(batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        bs = int(self._tensors(batch)["input_ids"].shape[0])
        self.log_train_pooled(self.train_acceptance(out), bs)  # this step's counts, summed over ranks
        self.add_denominator(out.denominator)
        return out.numerator  # normalised by the global denominator in on_before_optimizer_step

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_acceptance.update(self.compute_loss(batch, step=VAL_STEP))


__all__ = ["CHECKPOINT_KEY", "DepthMetric", "PEagleModule"]
