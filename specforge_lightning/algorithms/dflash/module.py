"""DFlash as a LightningModule: anchors, the block forward, the CE / D-PACE loss and block acceptance.

Global loss normalisation (upstream: gradients are normalised by the denominator
summed over all ranks and all accumulation micro-steps), as ``TokenNormalizedDraftModule``
does it: ``training_step`` returns the *numerator* of its micro-batch, and the gradient is
exactly ``∇ Σ numerators / Σ denominators`` over the whole optimizer step, independent
of how the tokens are spread across ranks and micro-batches. The logged
``train/loss`` is the ratio of the step's counts summed across ranks.

Anchors are drawn from generators seeded by ``(anchor_seed, global_step,
sample_id)``, so a resumed run draws the same anchors as an uninterrupted one,
on any world size. Validation uses step -1: fixed anchors per sample.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torchmetrics import Metric

from specforge_lightning.algorithms.draft_module import TokenNormalizedDraftModule
from specforge_lightning.algorithms.target_weights import EMBEDDING, load_frozen_head, read_target_config
from specforge_lightning.algorithms.dflash.loss import (
    LOSS_TYPES,
    BlockCounts,
    DFlashLossOutput,
    anchor_seed,
    block_labels,
    dflash_loss,
    sample_anchors,
)
from specforge_lightning.algorithms.dflash.model import DFlashConfig, DFlashDraft
from specforge_lightning.contracts import FeatureContext, StrategySpec

CHECKPOINT_KEY = "dflash"
VAL_STEP = -1


def resolve_mask_token_id(target_dir: str | Path, vocab_size: int, explicit: int | None = None) -> int:
    """The MASK id (reference §4.7): explicit > tokenizer mask > first unused embedding row > pad > eos > unk."""
    if explicit is not None:
        candidate: int | None = int(explicit)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(target_dir))
        unused = len(tok) if len(tok) < vocab_size else None
        options = (tok.mask_token_id, unused, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
        candidate = next((int(c) for c in options if c is not None), None)
    if candidate is None or not 0 <= candidate < vocab_size:
        raise ValueError(f"no usable MASK token id for {target_dir} (got {candidate}, embedding vocab {vocab_size})")
    return candidate


class BlockAcceptanceMetric(Metric):
    """Block-drafting counts and a loss ratio, all sum-reduced across ranks before any ratio is formed.

    ``compute()`` → ``acc_k`` (P,), pooled ``acc``, ``acceptance_length`` (mean over real
    blocks of leading-correct + 1: the bonus token counted, as for EAGLE3) and ``loss``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_positions: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_positions = num_positions
        self.add_state("correct", default=torch.zeros(num_positions, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_positions, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("accepted", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("blocks", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("loss_num", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("loss_den", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, counts: BlockCounts, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
        if counts.correct.shape != (self.num_positions,):
            raise ValueError(f"expected {self.num_positions} positions, got {tuple(counts.correct.shape)}")
        self.correct += counts.correct.detach().long()
        self.total += counts.total.detach().long()
        self.accepted += counts.accepted.detach().long()
        self.blocks += counts.blocks.detach().long()
        self.loss_num += numerator.detach().double()
        self.loss_den += denominator.detach().double()

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "acc_k": self.correct.double() / self.total.clamp_min(1).double(),
            "acc": self.correct.sum().double() / self.total.sum().clamp_min(1).double(),
            "acceptance_length": self.accepted.double() / self.blocks.clamp_min(1).double(),
            "loss": self.loss_num / self.loss_den.clamp_min(1e-12),
        }


class DFlashModule(TokenNormalizedDraftModule):
    """Train a DFlash block draft (upstream defaults: 1 layer, block 16, 512 anchors, lr 6e-4).

    Args:
        num_layers: draft decoder layers.
        block_size: tokens per block (anchor + block_size-1 MASK slots).
        num_anchors: anchors drawn per sample (at most; fewer when fewer are valid).
        loss_type: ``dflash`` (CE) or a D-PACE variant (``dpace``,
            ``dpace-cumulative-confidence-only``, ``dpace-continuation-value-only``).
        loss_decay_gamma: position decay ``exp(-(j-1)/γ)`` for the CE loss (None = off; recipes 7.0).
        dpace_alpha: D-PACE α.
        mask_token_id: MASK id; None resolves it from the target's tokenizer (reference §4.7).
        qk_norm: per-head q/k RMSNorm (on by default: SGLang's DFlashDraftModel always applies it);
            None follows the target's model type (on for Qwen3 only).
        anchor_seed: seed of the anchor draws (with the step and the sample id).
        objective_chunk_rows: scored rows whose full-vocab logits exist at once (0 = all).
        lr, weight_decay, betas, warmup_ratio, min_lr_ratio: AdamW + warmup/cosine per optimizer step.
        anneal_by_time: the cosine also follows the spent share of ``trainer.max_time``.
        frozen_dtype: storage dtype of the frozen embedding and head (None: as in the target files).
    """

    strategy_spec: ClassVar[StrategySpec] = StrategySpec(
        name="dflash",
        features=("input_ids", "loss_mask", "aux_hidden_states"),
        min_supervised_run=2,
        layer_preset="spread:5",
        resume_strict_hparams=("block_size", "loss_type", "loss_decay_gamma", "dpace_alpha"),
    )
    checkpoint_key: ClassVar[str] = CHECKPOINT_KEY
    label_shift: ClassVar[int] = 0

    def __init__(
        self,
        num_layers: int = 1,
        block_size: int = 16,
        num_anchors: int = 512,
        loss_type: str = "dflash",
        loss_decay_gamma: float | None = None,
        dpace_alpha: float = 0.5,
        mask_token_id: int | None = None,
        qk_norm: bool | None = True,
        anchor_seed: int = 0,
        objective_chunk_rows: int = 2048,
        lr: float = 6e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.04,
        min_lr_ratio: float = 0.0,
        anneal_by_time: bool = False,
        frozen_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        self.save_hyperparameters()
        self._init_common()

    def _init_common(self) -> None:
        self.draft: DFlashDraft | None = None
        self.draft_config: DFlashConfig | None = None
        self.context: FeatureContext | None = None
        P = self.num_positions
        self.train_acceptance = BlockAcceptanceMetric(P, dist_sync_on_step=True)
        self.val_acceptance = BlockAcceptanceMetric(P)

    @property
    def num_positions(self) -> int:
        """Predicted positions per block: bs-1 (the anchor slot is not scored), bs with shifted labels."""
        return self.hparams.block_size - 1 + self.label_shift

    # ------------------------------------------------------------------ building

    def make_config(self, target_cfg: Mapping[str, Any], context: FeatureContext) -> DFlashConfig:
        hp = self.hparams
        mask_id = resolve_mask_token_id(context.target_dir, int(target_cfg["vocab_size"]), hp.mask_token_id)
        return DFlashConfig.from_target_config(
            target_cfg, context.layer_ids, mask_id, hp.num_layers, hp.block_size, hp.qk_norm
        )

    def make_draft(self, config: DFlashConfig) -> DFlashDraft:
        return DFlashDraft(config)

    def build(self, context: FeatureContext) -> None:
        """Create the draft for ``context``'s target and attach its frozen embedding and head."""
        target_cfg = read_target_config(context.target_dir)
        config = self.make_config(target_cfg, context)
        if config.hidden_size != context.hidden_size or config.vocab_size != context.vocab_size:
            raise ValueError(
                f"feature context (hidden {context.hidden_size}, vocab {context.vocab_size}) does not match "
                f"the target config in {context.target_dir} ({config.hidden_size}, {config.vocab_size})"
            )
        self._build(context, config, target_cfg)

    def _build(self, context: FeatureContext, config: DFlashConfig, target_cfg: Mapping[str, Any]) -> None:
        draft = self.make_draft(config)
        tensors, head_name = load_frozen_head(context.target_dir, target_cfg, self.hparams.frozen_dtype)
        draft.set_target_weights(tensors[EMBEDDING], tensors[head_name])
        self.draft = draft.to(self.device)
        # Frozen tensors are identical on every rank: keep DDP from re-broadcasting them.
        self._ddp_params_and_buffers_to_ignore = ["draft.embed_tokens.weight", "draft.lm_head.weight"]
        self.draft_config, self.context = config, context

    @staticmethod
    def config_class() -> type[DFlashConfig]:
        return DFlashConfig

    def restore(self, context: FeatureContext, config: DFlashConfig) -> None:
        self._build(context, config, read_target_config(context.target_dir))

    # ------------------------------------------------------------------ the step

    @staticmethod
    def _tensors(batch: Any) -> dict[str, torch.Tensor]:
        return batch.tensors if hasattr(batch, "tensors") else batch

    def anchors_for(self, batch: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchors (B, N) and keep (B, N) for a batch, seeded per sample by (anchor_seed, step, sample id)."""
        t = self._tensors(batch)
        B = t["input_ids"].shape[0]
        ids = list(getattr(batch, "sample_ids", None) or [f"#{i}" for i in range(B)])
        seeds = [anchor_seed(self.hparams.anchor_seed, step, sid) for sid in ids]
        return sample_anchors(t["loss_mask"], self.hparams.num_anchors, seeds, t.get("attention_mask"))

    def draft_blocks(self, batch: Any, step: int | None = None) -> tuple[torch.Tensor, ...]:
        """``(input_ids, loss_mask, anchors, keep, block hidden states)``: the step's shared first half.

        The loss mask is multiplied by the attention mask; ``step`` (default ``global_step``) seeds the anchors.
        """
        t = self._tensors(batch)
        step = self.global_step if step is None else step
        input_ids, loss_mask = t["input_ids"], t["loss_mask"]
        if t.get("attention_mask") is not None:
            loss_mask = loss_mask * t["attention_mask"]
        anchors, keep = self.anchors_for(batch, step)
        return input_ids, loss_mask, anchors, keep, self.draft(input_ids, t["aux_hidden_states"], anchors, keep)

    def compute_loss(self, batch: Any, step: int | None = None) -> DFlashLossOutput:
        """Loss terms and block counts for a ``TrainBatch`` (or its tensor dict); ``step`` seeds the anchors."""
        hp = self.hparams
        input_ids, loss_mask, anchors, keep, hidden = self.draft_blocks(batch, step)
        labels, w = block_labels(input_ids, loss_mask, anchors, keep, hp.block_size, shift=0)
        return dflash_loss(
            hidden[:, :, 1:], labels, w, keep, self.draft.logits,
            loss_type=hp.loss_type, gamma=hp.loss_decay_gamma, alpha=hp.dpace_alpha, chunk=hp.objective_chunk_rows,
        )

    def forward(self, batch: Any) -> DFlashLossOutput:
        return self.compute_loss(batch)

    def _log_train(self, out: DFlashLossOutput, bs: int) -> None:
        # This step's counts, summed over ranks.
        self.log_train_pooled(self.train_acceptance(out.counts, out.numerator, out.denominator), bs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        self._log_train(out, int(self._tensors(batch)["input_ids"].shape[0]))
        self.add_denominator(out.denominator)
        return out.numerator  # normalised by the global denominator in on_before_optimizer_step

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.compute_loss(batch, step=VAL_STEP)
        self.val_acceptance.update(out.counts, out.numerator, out.denominator)


_DFLASH_ARGS = tuple(inspect.signature(DFlashModule.__init__).parameters)[1:]


def dflash_args(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """Of a subclass's ``__init__`` arguments (its ``locals()``), those ``DFlashModule.__init__`` takes.

    A subclass still spells out its full signature (LightningCLI reads it) and forwards the
    shared part with ``super().__init__(**dflash_args(locals()))``; what it does not offer
    (``loss_type``, ``dpace_alpha``) keeps DFlash's default.
    """
    return {name: init_args[name] for name in _DFLASH_ARGS if name in init_args}
