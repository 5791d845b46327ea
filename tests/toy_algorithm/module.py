"""The toy: one linear map from the target's aux states at t to the token at t+2; it drafts one token.

Everything an algorithm supplies is here: the module (training step, StrategySpec), the drafter,
an hf export writer and the two loaders, gathered in one ``Algorithm`` record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from specforge_lightning.algorithms.base import (
    Algorithm,
    ExportFormat,
    LoadedDraft,
    LoadOptions,
    VerifyingTarget,
    teacher_forced_aux,
)
from specforge_lightning.algorithms.draft_module import LazyDraftModule
from specforge_lightning.algorithms.export_files import context_essentials, read_weights, write_folder
from specforge_lightning.algorithms.target_weights import DraftConfigDict
from specforge_lightning.contracts import FeatureContext, StrategySpec, TrainBatch

NAME = "toy"
FORMAT = "tests.toy_algorithm"


@dataclass
class ToyConfig(DraftConfigDict):
    aux_width: int
    hidden_size: int
    vocab_size: int
    layer_ids: tuple[int, ...] = ()


class ToyDraft(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(config.aux_width, config.hidden_size, bias=False)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, aux: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(aux.to(self.fc.weight.dtype))))


class ToyModule(LazyDraftModule):
    """Cross-entropy of ``x_{t+2}`` given the aux states of ``x_t``, on supervised targets."""

    strategy_spec: ClassVar[StrategySpec] = StrategySpec(
        name=NAME, features=("input_ids", "loss_mask", "aux_hidden_states"), min_supervised_run=1,
        layer_preset="eagle3", resume_strict_hparams=(),
    )
    checkpoint_key: ClassVar[str] = NAME

    def __init__(self, lr: float = 1e-2, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.draft: ToyDraft | None = None
        self.draft_config: ToyConfig | None = None
        self.context: FeatureContext | None = None

    def build(self, context: FeatureContext) -> None:
        config = ToyConfig(len(context.layer_ids) * context.hidden_size, 32, context.vocab_size, tuple(context.layer_ids))
        self.restore(context, config)

    @staticmethod
    def config_class() -> type[ToyConfig]:
        return ToyConfig

    def restore(self, context: FeatureContext, config: ToyConfig) -> None:
        self.draft, self.draft_config, self.context = ToyDraft(config).to(self.device), config, context

    def _loss_and_hits(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = batch.tensors
        logits = self.draft(t["aux_hidden_states"][:, :-2])
        labels, mask = t["input_ids"][:, 2:], t["loss_mask"][:, 2:].bool()
        if "attention_mask" in t:
            mask &= t["attention_mask"][:, 2:].bool()
        loss = F.cross_entropy(logits[mask], labels[mask]) if mask.any() else logits.sum() * 0
        hits = (logits.argmax(-1) == labels) & mask
        return loss, hits.sum(), mask.sum()

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss_and_hits(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: TrainBatch, batch_idx: int) -> None:
        _, hits, total = self._loss_and_hits(batch)
        acc = hits.float() / total.clamp_min(1).float()
        self.log("val/acceptance_length", 1.0 + acc, batch_size=len(batch))


class ToyDrafter:
    """Proposes one token: the prediction of ``x_{n}`` from the aux states of ``x_{n-2}``."""

    description = "toy: one token per verify step"
    simulated_definition = "1 + teacher-forced top-1 accuracy of the one drafted token"

    def __init__(self, draft: ToyDraft) -> None:
        self.draft = draft.eval()
        self.layer_ids = tuple(draft.config.layer_ids)
        self.last: torch.Tensor | None = None

    def start(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        self.last = aux[-1:]

    def accept(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        self.last = aux[-1:]

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        return [int(self.draft(self.last).argmax(-1)[-1])] if k > 0 else []

    @torch.no_grad()
    def teacher_forced_counts(
        self, runner: VerifyingTarget, prompt_ids: Sequence[int], output_ids: Sequence[int], k: int
    ) -> tuple[list[int], list[int]]:
        """Slot t predicts ``x_{t+2}``; only the new tokens after the first one count (what ``propose`` drafts)."""
        correct, total = [0] * k, [0] * k
        seq = teacher_forced_aux(runner, prompt_ids, output_ids)
        if seq is not None:
            ids, aux = seq
            rows = torch.arange(max(0, len(prompt_ids) - 1), len(ids) - 2)
            pred = self.draft(aux).argmax(-1)[rows]
            correct[0] = int((pred == torch.tensor(ids)[rows + 2]).sum())
            total[0] = len(rows)
        return correct, total


def _loaded(draft: ToyDraft, source: str, kind: str, context: Mapping[str, Any]) -> LoadedDraft:
    c = draft.config
    return LoadedDraft(NAME, draft, source, kind, tuple(c.layer_ids), c.aux_width // max(1, len(c.layer_ids)),
                       c.vocab_size, c.vocab_size, dict(context), has_embedding=True)


def load_checkpoint(path: Path, ckpt: Mapping[str, Any], options: LoadOptions) -> LoadedDraft:
    module = ToyModule.load_from_checkpoint(path, map_location="cpu", weights_only=not options.trusted)
    return _loaded(module.draft.eval(), str(path), "checkpoint", context_essentials(asdict(module.context)))


def write_hf(loaded: LoadedDraft, out_dir: Path, dtype: torch.dtype | None) -> Path:
    tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous() for k, v in loaded.draft.state_dict().items()}
    config = {"specforge_format": FORMAT, "algorithm": NAME, "draft_config": loaded.draft.config.to_dict(),
              "feature_context": loaded.context}
    return write_folder(out_dir, config, tensors)


def load_export(folder: Path, cfg: Mapping[str, Any], options: LoadOptions) -> LoadedDraft:
    draft = ToyDraft(ToyConfig.from_dict({**cfg["draft_config"], "layer_ids": tuple(cfg["draft_config"]["layer_ids"])}))
    draft.load_state_dict(read_weights(folder))
    return _loaded(draft.eval(), str(folder), "hf", cfg.get("feature_context") or {})


ALGORITHM = Algorithm(
    name=NAME,
    module=ToyModule,
    load_checkpoint=load_checkpoint,
    owns_export=lambda cfg: cfg.get("specforge_format") == FORMAT,
    load_export=load_export,
    exports={"hf": ExportFormat(write=write_hf, description="toy folder")},
    make_drafter=lambda loaded, options: ToyDrafter(loaded.draft),
)

__all__ = ["ALGORITHM", "ToyDrafter", "ToyModule"]
