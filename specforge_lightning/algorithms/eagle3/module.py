"""EAGLE3 as a LightningModule: the draft, its frozen teacher head, the TTT loss and acceptance metrics.

The draft is built lazily from a ``FeatureContext`` (the target folder, the captured
layer ids and the vocab mapping): in ``setup`` from ``trainer.datamodule.feature_context``,
or in ``on_load_checkpoint`` from the context stored in the checkpoint, so
``Eagle3Module.load_from_checkpoint(path)`` works without a datamodule (the target
folder must still exist: the frozen embedding and teacher head are reloaded from it
and never stored in checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.draft_module import LazyDraftModule
from specforge_lightning.algorithms.target_weights import (
    EMBEDDING,
    load_frozen_head,
    load_vocab_mapping,
    read_target_config,
)
from specforge_lightning.algorithms.eagle3.init import Eagle3Initializer, SampleSource, assign_kv_heads
from specforge_lightning.algorithms.eagle3.loss import (
    Eagle3LossOutput,
    compute_teacher,
    eagle3_loss,
    effective_loss_mask,
    later_scored_rows,
)
from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft
from specforge_lightning.contracts import FeatureContext, StrategySpec, TrainBatch
from specforge_lightning.algorithms.metrics import AcceptanceMetric

CHECKPOINT_KEY = "eagle3"


class Eagle3Module(LazyDraftModule):
    """Train an EAGLE3 draft with the TTT loss (upstream defaults: 7 steps, decay 0.8).

    Args:
        ttt_length: TTT unroll length K.
        ttt_full_every: training steps unroll all K steps only on every N-th optimizer step and
            K-1 on the others (1: always K; validation always unrolls K). The last step is the
            most expensive one; seeing it now and then keeps the deeper chain positions
            trained at close to the cost of a shorter unroll.
        loss_decay: weight ``decay**k`` of step k.
        loss_normalize: ``"positions"`` (upstream: mean over all B·S) or ``"tokens"``.
        lr, weight_decay, betas: AdamW (torch defaults for betas/eps, as upstream).
        warmup_ratio, min_lr_ratio: linear warmup over ``int(warmup_ratio·total)`` optimizer
            steps, then cosine to ``min_lr_ratio·lr``; total = ``trainer.estimated_stepping_batches``.
        anneal_by_time: the cosine also follows the spent share of ``trainer.max_time``
            (``LazyDraftModule``): a time-capped run ends annealed at any machine speed.
        frozen_dtype: storage dtype of the frozen embedding and teacher head (``None``: as in
            the target files). The draft's own precision is the Trainer's ``precision``; the
            teacher softmax/argmax always run in fp32.
        teacher_chunk_size: rows of full-vocab teacher logits computed at once (``None``: all).
        init: initialisers of a fresh draft, applied in list order (``eagle3.init``: target
            head/norm/fc/midlayer copies, the current-token and copy heads, each with its knobs
            and measured effect); none reproduces upstream. Heads fitted on data read the
            datamodule's first training samples (``SampleSource.sample_features``, offline
            features). Plain ``{class_path, init_args}`` dicts are accepted too (the form kept in
            checkpoints' hyperparameters, so that they load with ``weights_only=True``).

    Gradient clipping is the Trainer's ``gradient_clip_val`` (recipes use 0.5, as upstream).
    """

    strategy_spec: ClassVar[StrategySpec] = StrategySpec(
        name="eagle3",
        features=("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state"),
        optional_features=("target_top1",),  # skips the teacher's full-vocabulary argmax
        min_supervised_run=1,
        layer_preset="eagle3",
        layer_count=3,
        resume_strict_hparams=("ttt_length", "loss_decay", "loss_normalize"),
    )
    checkpoint_key: ClassVar[str] = CHECKPOINT_KEY

    def __init__(
        self,
        ttt_length: int = 7,
        ttt_full_every: int = 1,
        loss_decay: float = 0.8,
        loss_normalize: str = "positions",
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.015,
        min_lr_ratio: float = 0.0,
        anneal_by_time: bool = False,
        frozen_dtype: str | None = None,
        teacher_chunk_size: int | None = None,
        init: list[Eagle3Initializer] | None = None,
    ) -> None:
        super().__init__()
        if loss_normalize not in ("positions", "tokens"):
            raise ValueError(f"loss_normalize must be 'positions' or 'tokens', got {loss_normalize!r}")
        if ttt_length < 1:
            raise ValueError(f"ttt_length must be >= 1, got {ttt_length}")
        if ttt_full_every < 1:
            raise ValueError(f"ttt_full_every must be >= 1 (1: every step unrolls ttt_length), got {ttt_full_every}")
        self.initializers = [Eagle3Initializer.from_spec(x) for x in init or ()]
        init = [x.spec() for x in self.initializers]  # hparams keep the plain form (weights_only loading)
        self.save_hyperparameters()
        self.draft: Eagle3Draft | None = None
        self.draft_config: Eagle3Config | None = None
        self.context: FeatureContext | None = None
        self.register_buffer("teacher_head", None, persistent=False)
        self.train_acceptance = AcceptanceMetric(ttt_length, dist_sync_on_step=True)
        self.val_acceptance = AcceptanceMetric(ttt_length)

    # ------------------------------------------------------------------ building

    def build(self, context: FeatureContext) -> None:
        """Create the draft for ``context``'s target, load frozen weights and the vocab mapping, smart-init."""
        target_cfg = read_target_config(context.target_dir)
        config = Eagle3Config.from_target_config(target_cfg, context.draft_vocab_size, context.layer_ids)
        if config.target_hidden_size != context.hidden_size or config.vocab_size != context.vocab_size:
            raise ValueError(
                f"feature context (hidden {context.hidden_size}, vocab {context.vocab_size}) does not match "
                f"the target config in {context.target_dir} ({config.target_hidden_size}, {config.vocab_size})"
            )
        self._build(context, config, target_cfg, fresh=True)

    def _build(self, context: FeatureContext, config: Eagle3Config, target_cfg: dict[str, Any], fresh: bool) -> None:
        draft = Eagle3Draft(config)
        extra = [k for x in self.initializers for k in x.target_keys(target_cfg)] if fresh else []
        tensors, head_name = load_frozen_head(context.target_dir, target_cfg, self.hparams.frozen_dtype, extra)
        draft.embed_tokens.weight = tensors[EMBEDDING]
        if fresh:  # a restored checkpoint carries d2t/t2d itself
            draft.set_vocab_mapping(
                *load_vocab_mapping(context.vocab_mapping_path, config.vocab_size, config.draft_vocab_size)
            )
        if fresh and self.initializers:
            exact = {k: v.float() for k, v in tensors.items()}
            for initializer in self.initializers:
                initializer.at_build(draft, exact, target_cfg)
        self.teacher_head = tensors[head_name].to(self.device)
        self.draft = draft.to(self.device)
        # The frozen tensors are identical on every rank: keep DDP from re-broadcasting them each step.
        self._ddp_params_and_buffers_to_ignore = ["teacher_head", "draft.embed_tokens.weight"]
        self.draft_config, self.context = config, context

    def on_fit_start(self) -> None:
        # Here, not in setup: only now does the trainer know whether a checkpoint was restored.
        fresh = self.trainer.ckpt_path is None and self.trainer.global_step == 0
        if fresh and self.initializers:
            self.plant_heads(self.trainer.datamodule)

    def plant_heads(self, datamodule: Any) -> dict[str, float]:
        """Run the initialisers' ``at_fit_start`` (the planted heads) on the datamodule's first training samples."""
        kv_heads = assign_kv_heads(self.initializers, self.draft_config.num_key_value_heads)
        samples: Sequence[dict[str, torch.Tensor]] = ()
        wanting = [x for x in self.initializers if x.samples > 0]
        if wanting:
            names = [type(x).__name__ for x in wanting]
            if not isinstance(datamodule, SampleSource):
                raise ValueError(
                    f"model.init_args.init: {' and '.join(names)} {'needs' if len(names) == 1 else 'need'} "
                    f"training samples before the first step, which {type(datamodule).__name__} cannot provide "
                    f"(no sample_features); use offline features (FeatureDataModule) or drop "
                    f"{' and '.join(names)} from model.init_args.init"
                )
            keys = list(dict.fromkeys(k for x in wanting for k in x.sample_keys))
            samples = datamodule.sample_features(max(x.samples for x in wanting), keys=tuple(keys))
        report: dict[str, float] = {}
        for initializer, kv_head in zip(self.initializers, kv_heads):
            head_samples = samples[: initializer.samples]
            report.update(
                initializer.at_fit_start(self.draft, head_samples, kv_head=kv_head, max_length=self.context.max_length)
            )
        return report

    @staticmethod
    def config_class() -> type[Eagle3Config]:
        return Eagle3Config

    def restore(self, context: FeatureContext, config: Eagle3Config) -> None:
        self._build(context, config, read_target_config(context.target_dir), fresh=False)

    # ------------------------------------------------------------------ the step

    def compute_loss(self, batch: Any, length: int | None = None) -> Eagle3LossOutput:
        """Loss and acceptance counts for a ``TrainBatch`` (or its tensor dict); usable from any loop.

        ``length`` overrides the unroll (default ``ttt_length``); counts then have ``length`` entries.
        """
        t = batch.tensors if isinstance(batch, TrainBatch) else batch
        input_ids = t["input_ids"]
        attention_mask = t.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = effective_loss_mask(t["loss_mask"], attention_mask)
        teacher = compute_teacher(
            t["last_hidden_state"], self.teacher_head, self.draft.t2d, mask, self.hparams.teacher_chunk_size,
            target_top1=t.get("target_top1"),
        )
        length = self.hparams.ttt_length if length is None else length
        steps = self.draft.ttt_forward(
            input_ids,
            t["aux_hidden_states"],
            attention_mask,
            length,
            with_logits=False,
            later_rows=later_scored_rows(mask, length),
        )
        return eagle3_loss(
            [hidden for _, hidden in steps],
            teacher,
            self.draft.d2t,
            decay=self.hparams.loss_decay,
            normalize=self.hparams.loss_normalize,
            head=self.draft.compute_logits,
        )

    def forward(self, batch: Any) -> Eagle3LossOutput:
        return self.compute_loss(batch)

    @staticmethod
    def _batch_size(batch: Any) -> int:
        t = batch.tensors if isinstance(batch, TrainBatch) else batch
        return int(t["input_ids"].shape[0])

    def train_length(self) -> int:
        """The unroll of the current optimizer step (``ttt_full_every``)."""
        K, every = self.hparams.ttt_length, self.hparams.ttt_full_every
        return K if K == 1 or self.trainer.global_step % every == 0 else K - 1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch, self.train_length())
        bs = self._batch_size(batch)
        missing = self.hparams.ttt_length - len(out.correct)  # a shorter unroll counts nothing there
        correct, total = (F.pad(c, (0, missing)) for c in (out.correct, out.total))
        pooled = self.train_acceptance(correct, total)  # this step's counts, summed over ranks
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=bs)
        if not missing:  # a shorter unroll has no count for the last position
            self.log("train/acceptance_length", pooled["acceptance_length"], prog_bar=True, batch_size=bs)
        for k in range(len(out.ploss)):
            self.log(f"train/acc_{k}", pooled["acc_k"][k], batch_size=bs)
            self.log(f"train/ploss_{k}", out.ploss[k].detach(), batch_size=bs)
        return out.loss

    def on_train_epoch_start(self) -> None:
        self.train_acceptance.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.compute_loss(batch)
        self.val_acceptance.update(out.correct, out.total)
        self.log("val/loss", out.loss, on_epoch=True, sync_dist=True, batch_size=self._batch_size(batch))

    def on_validation_epoch_end(self) -> None:
        result = self.val_acceptance.compute()  # states are summed across ranks first
        self.val_acceptance.reset()
        # Every rank holds the same global value; sync_dist only silences Lightning's epoch-level warning.
        self.log("val/acceptance_length", result["acceptance_length"].float(), prog_bar=True, sync_dist=True)
        self.log("val/acc", result["acc"].float(), sync_dist=True)
        for k, a in enumerate(result["acc_k"]):
            self.log(f"val/acc_{k}", a.float(), sync_dist=True)
