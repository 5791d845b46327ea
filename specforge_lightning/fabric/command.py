"""``python -m specforge_lightning fabric --config RECIPE [--key=value ...]``: the fit recipe, run by the Fabric loop.

The command line is parsed by the very parser ``fit`` uses (``cli.build_cli``'s LightningCLI
with its checkpoint, resume and preemption groups, ``--trainer.callbacks+=...``, links and
seed), so a recipe and its overrides mean the same under both. The ``trainer:`` section maps
onto Fabric (accelerator, devices, num_nodes, strategy, precision) and onto ``LoopSettings``
(max_steps, max_epochs, accumulate_grad_batches, gradient_clip_*, val_check_interval,
check_val_every_n_epoch, limit_val_batches, log_every_n_steps, default_root_dir); a Trainer
argument the loop does not honour is refused by name when it is set.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import lightning as L
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import ModelSummary, ProgressBar

from specforge_lightning.cli import RUN_CONFIG, _cli_class
from specforge_lightning.errors import UserError
from specforge_lightning.fabric.loop import FabricLoop
from specforge_lightning.fabric.view import LoopSettings

FABRIC_ARGS = ("accelerator", "devices", "num_nodes", "strategy", "precision")
LOOP_ARGS = tuple(f.name for f in fields(LoopSettings))
# Trainer arguments that only shape Lightning's own display or bookkeeping: nothing to map.
IGNORED = ("callbacks", "logger", "enable_progress_bar", "enable_model_summary", "enable_checkpointing",
           "num_sanity_val_steps", "benchmark", "deterministic", "use_distributed_sampler")


def _trainer_defaults() -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(L.Trainer.__init__).parameters.items() if name != "self"}


def split_trainer(trainer: dict[str, Any]) -> tuple[dict[str, Any], LoopSettings]:
    """(Fabric kwargs, LoopSettings) from a parsed ``trainer`` section; unsupported settings are refused."""
    defaults = _trainer_defaults()
    refused = [k for k, v in trainer.items()
               if k not in (*FABRIC_ARGS, *LOOP_ARGS, *IGNORED) and k in defaults and v != defaults[k]]
    if refused:
        raise UserError(
            f"trainer.{refused[0]}: the fabric command does not run {', '.join('trainer.' + k for k in refused)}; "
            "remove it from the recipe (or use the fit command)"
        )
    strategy = trainer.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy not in ("auto", "ddp", "single_device"):
        raise UserError(f"trainer.strategy={strategy!r}: the fabric command takes auto or ddp")
    fabric_kwargs = {k: trainer[k] for k in FABRIC_ARGS if k in trainer}
    given = {k: trainer[k] for k in LOOP_ARGS if k in trainer}
    if given.get("log_every_n_steps") is None:  # the Trainer's None means its default
        given.pop("log_every_n_steps", None)
    loop = LoopSettings(**given)
    return fabric_kwargs, loop


def _fabric_cli_class() -> type:
    """The fit CLI, stopped before it would build a Trainer: the trainer section is kept as parsed."""

    class FabricCLI(_cli_class()):
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="resume: a checkpoint file, 'last' or 'best' (written by fit or fabric)")

        def instantiate_trainer(self, **kwargs: Any) -> dict[str, Any]:
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            trainer = dict(self._get(self.config_init, "trainer", default={}))
            given = trainer.get("callbacks") or []
            trainer["callbacks"] = [*(given if isinstance(given, list) else [given]), *extra]
            return trainer

    return FabricCLI


def build(args: Sequence[str]) -> tuple[FabricLoop, str | None]:
    """The loop a ``fabric`` command line describes, and its ``--ckpt_path``."""
    import lightning.pytorch as pl

    with warnings.catch_warnings():  # sys.argv holds the same line on purpose (see main)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _fabric_cli_class()(
            pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=list(args), seed_everything_default=0, run=False,
        )
    trainer = cli.trainer
    fabric_kwargs, settings = split_trainer(trainer)
    loggers = trainer.get("logger")
    loggers = [] if loggers in (None, False, True) else list(loggers) if isinstance(loggers, list) else [loggers]
    callbacks = [c for c in trainer["callbacks"] if not isinstance(c, (ProgressBar, ModelSummary))]
    loop = FabricLoop(Fabric(**fabric_kwargs), cli.model, cli.datamodule, settings, callbacks, loggers)
    root = loop.view.default_root_dir
    if loop.fabric.global_rank == 0 and os.environ.get("LOCAL_RANK", "0") == "0":
        os.makedirs(root, exist_ok=True)
        cli.parser.save(cli.config, os.path.join(root, RUN_CONFIG), skip_none=False, overwrite=True)
    return loop, cli.config.get("ckpt_path")


def main(args: Sequence[str]) -> None:
    """Run ``fabric`` on ``args``; ``sys.argv`` holds the command line, as Fabric's DDP launcher re-runs it."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "specforge_lightning", "fabric", *args]
    try:
        loop, ckpt_path = build(args)
        loop.fit(ckpt_path=ckpt_path)
        step = loop.view.global_step
        if loop.fabric.is_global_zero:
            print(f"fabric: trained to optimizer step {step} in {loop.view.default_root_dir}")
    finally:
        sys.argv = saved
