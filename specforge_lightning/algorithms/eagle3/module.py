"""EAGLE3 as a LightningModule: the draft, its frozen teacher head, the TTT loss and acceptance metrics.

The draft is built lazily from a ``FeatureContext`` (the target folder, the captured
layer ids and the vocab mapping): in ``setup`` from ``trainer.datamodule.feature_context``,
or in ``on_load_checkpoint`` from the context stored in the checkpoint, so
``Eagle3Module.load_from_checkpoint(path)`` works without a datamodule (the target
folder must still exist: the frozen embedding and teacher head are reloaded from it
and never stored in checkpoints).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from specforge_lightning.algorithms.common import (
    LazyDraftModule,
    load_target_tensors,
    load_vocab_mapping,
    read_target_config,
    target_head_name,
)
from specforge_lightning.algorithms.eagle3.copy_head import plant_copy_head
from specforge_lightning.algorithms.eagle3.loss import (
    Eagle3LossOutput,
    compute_teacher,
    eagle3_loss,
    effective_loss_mask,
    later_scored_rows,
)
from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft, target_keys_for_init
from specforge_lightning.algorithms.eagle3.self_head import plant_self_head
from specforge_lightning.contracts import FeatureContext, StrategySpec
from specforge_lightning.evaluation.metrics import AcceptanceMetric

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
        init_*: smart initialisation from the target, each part switchable
            (see ``Eagle3Draft.init_from_target``); all off reproduces upstream.
        init_copy_head: plant a copy (induction) head before training
            (``copy_head.plant_copy_head``), fitted on the first ``init_copy_samples`` training
            samples, which the datamodule provides through ``sample_features(n)`` (offline
            features). Best with ``init_lm_head`` and ``init_norm``.
        init_copy_strength, init_copy_sharpness: size of the copied token's vector relative
            to the hidden stream, and the query scale (softmax temperature).
        init_copy_previous: weight of the previous-token match (0: match one token only);
            it tells apart two occurrences of a token by the token before each.
        init_self_head: plant a current-token head (``self_head.plant_self_head``) that carries
            the embedding of the token drafted from into the residual stream as a bigram guess;
            fitted on the same samples (key/value head 1 when the copy head holds head 0).
        init_self_strength: size of its write relative to the hidden stream (``fc``'s output).

    Gradient clipping is the Trainer's ``gradient_clip_val`` (recipes use 0.5, as upstream).
    """

    strategy_spec: ClassVar[StrategySpec] = StrategySpec(
        name="eagle3",
        features=("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state"),
        optional_features=("target_top1",),  # skips the teacher's full-vocabulary argmax
        min_supervised_run=1,
        layer_preset="eagle3",
        loss=eagle3_loss,
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
        init_lm_head: bool = False,
        init_norm: bool = False,
        init_fc: bool = False,
        init_midlayer: bool = False,
        init_layer: int = -1,
        init_fc_chunk: int = -1,
        init_emb_half_scale: float = 0.0,
        init_copy_head: bool = False,
        init_copy_samples: int = 128,
        init_copy_strength: float = 2.0,
        init_copy_sharpness: float = 3.0,
        init_copy_previous: float = 0.0,
        init_self_head: bool = False,
        init_self_strength: float = 8.0,
    ) -> None:
        super().__init__()
        if loss_normalize not in ("positions", "tokens"):
            raise ValueError(f"loss_normalize must be 'positions' or 'tokens', got {loss_normalize!r}")
        if ttt_length < 1:
            raise ValueError(f"ttt_length must be >= 1, got {ttt_length}")
        if ttt_full_every < 1:
            raise ValueError(f"ttt_full_every must be >= 1 (1: every step unrolls ttt_length), got {ttt_full_every}")
        if init_copy_previous < 0:
            raise ValueError(f"init_copy_previous must be >= 0 (0: off), got {init_copy_previous}")
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
        hp = self.hparams
        draft = Eagle3Draft(config)
        smart = fresh and any((hp.init_lm_head, hp.init_norm, hp.init_fc, hp.init_midlayer))
        head_name = target_head_name(target_cfg)
        names = ["model.embed_tokens.weight", head_name]
        if smart:
            names += target_keys_for_init(target_cfg, hp.init_layer)
        dtype = getattr(torch, hp.frozen_dtype) if hp.frozen_dtype else None
        tensors = load_target_tensors(context.target_dir, names, dtype=dtype)
        if head_name not in tensors:  # untied config but no separate head in the files
            head_name = "model.embed_tokens.weight"
        draft.embed_tokens.weight = tensors["model.embed_tokens.weight"]
        if fresh:  # a restored checkpoint carries d2t/t2d itself
            draft.set_vocab_mapping(
                *load_vocab_mapping(context.vocab_mapping_path, config.vocab_size, config.draft_vocab_size)
            )
        if smart:
            draft.init_from_target(
                {k: v.float() for k, v in tensors.items()},
                target_cfg,
                lm_head=hp.init_lm_head,
                norm=hp.init_norm,
                fc=hp.init_fc,
                midlayer=hp.init_midlayer,
                layer=hp.init_layer,
                fc_chunk=hp.init_fc_chunk,
                emb_half_scale=hp.init_emb_half_scale,
            )
        self.teacher_head = tensors[head_name].to(self.device)
        self.draft = draft.to(self.device)
        # The frozen tensors are identical on every rank: keep DDP from re-broadcasting them each step.
        self._ddp_params_and_buffers_to_ignore = ["teacher_head", "draft.embed_tokens.weight"]
        self.draft_config, self.context = config, context

    def on_fit_start(self) -> None:
        # Here, not in setup: only now does the trainer know whether a checkpoint was restored.
        fresh = self.trainer.ckpt_path is None and self.trainer.global_step == 0
        if fresh and (self.hparams.init_copy_head or self.hparams.init_self_head):
            self.plant_heads(self.trainer.datamodule)

    def plant_heads(self, datamodule: Any) -> dict[str, float]:
        """Fit and plant the current-token and/or copy head on the datamodule's first training samples."""
        hp = self.hparams
        flag = "init_self_head" if hp.init_self_head else "init_copy_head"
        sample = getattr(datamodule, "sample_features", None)
        if sample is None:
            raise ValueError(
                f"model.{flag} needs training samples before the first step, which "
                f"{type(datamodule).__name__} cannot provide (no sample_features); use offline features "
                f"(FeatureDataModule) or set model.{flag}=false"
            )
        keys = ["input_ids", "aux_hidden_states"]
        if hp.init_self_head:
            keys += ["loss_mask", "last_hidden_state"]
        samples = sample(hp.init_copy_samples, keys=tuple(keys))
        columns = {k: [s[k] for s in samples] for k in keys}
        report: dict[str, float] = {}
        if hp.init_self_head:
            kv_head = 1 if hp.init_copy_head else 0
            if kv_head >= self.draft_config.num_key_value_heads:
                raise ValueError(
                    "model.init_self_head and model.init_copy_head each need their own key/value head; "
                    f"this draft has {self.draft_config.num_key_value_heads}"
                )
            own = plant_self_head(
                self.draft,
                columns["input_ids"],
                columns["aux_hidden_states"],
                columns["last_hidden_state"],
                columns["loss_mask"],
                kv_head=kv_head,
                strength=hp.init_self_strength,
            )
            rank_zero_info(
                f"current-token head planted from {int(own['tokens'])} supervised sample tokens: its bigram guess "
                f"agrees with the target's next state for {own['bigram_accuracy']:.0%} of held-out positions"
            )
            report.update({f"self_{k}": v for k, v in own.items()})
        if hp.init_copy_head:
            copy = plant_copy_head(
                self.draft,
                columns["input_ids"],
                columns["aux_hidden_states"],
                max_position=max(512, self.context.max_length),
                sharpness=hp.init_copy_sharpness,
                strength=hp.init_copy_strength,
                previous=hp.init_copy_previous,
            )
            previous = (
                f"; the previous token for {copy['previous_token_accuracy']:.0%} ({int(copy['previous_dims'])} dims)"
                if "previous_dims" in copy
                else ""
            )
            rank_zero_info(
                f"copy head planted from {int(copy['tokens'])} sample tokens: keys recover the slot's token for "
                f"{copy['key_token_accuracy']:.0%} of held-out positions ({int(copy['content_dims'])} content dims)"
                + previous
            )
            report.update(copy)
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
        t = batch.tensors if hasattr(batch, "tensors") else batch
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
        t = batch.tensors if hasattr(batch, "tensors") else batch
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
