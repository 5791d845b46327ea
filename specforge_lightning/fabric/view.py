"""TrainerView: the part of ``lightning.Trainer`` that modules, datamodules and callbacks read, served by the Fabric loop.

The algorithm modules, the datamodules and the project's callbacks read a handful of
Trainer attributes (``global_step``, ``world_size``, ``accumulate_grad_batches``,
``estimated_stepping_batches``, ``datamodule``, ``strategy.reduce`` ...). Under the
Fabric loop they get this object instead, so their code runs unchanged and every number
they compute is the one the Trainer would give them. Anything not listed here raises an
AttributeError that names this file: a callback that needs more must say so, not guess.

``strategy`` is a real Lightning ``SingleDeviceStrategy``/``DDPStrategy`` over the process
group Fabric created, so ``reduce``/``broadcast``/``barrier`` and ``checkpoint_io`` behave
exactly as under the Trainer. ``log`` stands in for ``LightningModule.log``: values land in
``callback_metrics`` with Lightning's reductions (on step: the value; on epoch: the
batch-size-weighted mean, averaged across ranks when ``sync_dist``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType

from specforge_lightning.errors import UserError


@dataclass
class LoopSettings:
    """The Trainer arguments the Fabric loop honours, with the Trainer's defaults and meaning."""

    max_steps: int = -1
    max_epochs: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int | None = 1
    limit_val_batches: int | float | None = None
    log_every_n_steps: int = 50
    default_root_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_epochs is None:  # the Trainer's rule: max_steps alone means no epoch limit
            self.max_epochs = -1 if self.max_steps != -1 else 1000
        if self.accumulate_grad_batches < 1:
            raise UserError(f"trainer.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        if self.val_check_interval is None:
            self.val_check_interval = 1.0


@dataclass
class Progress:
    """Where training is; what Lightning's loop progress counters say, kept as plain numbers."""

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0  # batches trained in this epoch (Lightning: batch_progress.current.ready)
    total_batches: int = 0  # batches trained in all epochs (batch_progress.total.ready)
    steps_in_epoch: int = 0  # optimizer steps in this epoch (scheduler_progress.current)
    val_batches_in_epoch: int = 0  # val_loop.batch_progress.total (reset every epoch)
    val_batches_last: int = 0  # val_loop.batch_progress.current (the last validation)
    validated: bool = False  # val_loop.batch_progress.is_last_batch
    last_batch: bool = False  # batch_progress.is_last_batch


def lightning_strategy(fabric: Fabric) -> Strategy:
    """The Lightning (pytorch) strategy matching Fabric's: the same collectives on the same process group."""
    if fabric.world_size == 1:
        return SingleDeviceStrategy(device=fabric.device)
    fs = fabric.strategy
    if type(fs).__name__ != "DDPStrategy":
        raise UserError(
            f"trainer.strategy: the fabric command runs single-device or ddp, not {type(fs).__name__}; "
            "use --trainer.strategy=ddp (or the fit command)"
        )
    return DDPStrategy(parallel_devices=fs.parallel_devices, cluster_environment=fs.cluster_environment)


@dataclass
class _EpochMean:
    total: torch.Tensor
    count: torch.Tensor
    sync: bool


class TrainerView:
    """What a module, datamodule or callback may read of "the trainer" while the Fabric loop runs it.

    Args:
        fabric: the launched Fabric.
        settings: the Trainer arguments in force.
        module, datamodule: the run's LightningModule and LightningDataModule.
        callbacks: Lightning callbacks; their hooks receive this view as ``trainer``.
        loggers: Lightning loggers (``log_metrics``/``save``), written by rank 0.
    """

    def __init__(self, fabric: Fabric, settings: LoopSettings, module: Any, datamodule: Any,
                 callbacks: list[Any], loggers: list[Any]) -> None:
        self.fabric = fabric
        self.settings = settings
        self.lightning_module = module
        self.datamodule = datamodule
        self.callbacks = callbacks
        self.loggers = loggers
        self.progress = Progress()
        self.strategy = lightning_strategy(fabric)
        self.precision_plugin = Precision()  # no loss scaler: bf16/fp32 gradients are true values
        self.state = SimpleNamespace(fn=TrainerFn.FITTING, stage="train")
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.logged_metrics: dict[str, torch.Tensor] = {}
        self.should_stop = False
        self.training = True
        self.sanity_checking = False
        self.fast_dev_run = False
        self.ckpt_path: str | None = None
        self.train_dataloader: Any = None
        self.save_checkpoint_fn: Any = None  # set by the loop: (path) -> None
        self._epoch_means: dict[str, _EpochMean] = {}

    # -- what modules read --------------------------------------------------------------

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def current_epoch(self) -> int:
        return self.progress.epoch

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def global_rank(self) -> int:
        return self.fabric.global_rank

    @property
    def local_rank(self) -> int:
        return self.fabric.local_rank

    @property
    def node_rank(self) -> int:
        return self.fabric.node_rank

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero

    @property
    def accumulate_grad_batches(self) -> int:
        return self.settings.accumulate_grad_batches

    @property
    def max_steps(self) -> int:
        return self.settings.max_steps

    @property
    def max_epochs(self) -> int | None:
        return self.settings.max_epochs

    max_time = None  # not offered: anneal_by_time and Timer need the Trainer

    @property
    def gradient_clip_val(self) -> float | None:
        return self.settings.gradient_clip_val

    @property
    def gradient_clip_algorithm(self) -> GradClipAlgorithmType | None:
        algorithm = self.settings.gradient_clip_algorithm
        return GradClipAlgorithmType(algorithm.lower()) if algorithm is not None else None

    @property
    def num_training_batches(self) -> int | float:
        loader = self.train_dataloader
        try:
            return len(loader)
        except TypeError:  # a stream has no length
            return float("inf")

    @property
    def estimated_stepping_batches(self) -> int | float:
        """As ``Trainer.estimated_stepping_batches``: max_steps alone, else epochs × steps per epoch."""
        s = self.settings
        if s.max_epochs == -1:
            return float("inf") if s.max_steps == -1 else s.max_steps
        if self.train_dataloader is None:
            self.train_dataloader = self.datamodule.train_dataloader()
        total = self.num_training_batches
        if total == float("inf"):
            return s.max_steps
        steps = math.ceil(total / s.accumulate_grad_batches) * max(s.max_epochs, 1)
        return min(steps, s.max_steps) if s.max_steps != -1 else steps

    @property
    def default_root_dir(self) -> str:
        return os.path.abspath(self.settings.default_root_dir or os.getcwd())

    @property
    def logger(self) -> Any:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        logger = self.logger
        return getattr(logger, "log_dir", None) or self.default_root_dir

    def save_checkpoint(self, path: str, weights_only: bool = False, storage_options: Any = None) -> None:
        """What ``SpecForgeCheckpoint`` calls: every rank gathers, rank 0 writes atomically."""
        self.save_checkpoint_fn(path)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"the Fabric loop's trainer has no {name!r} (see specforge_lightning/fabric/view.py for what it offers); "
            "a callback that needs it runs under the fit command"
        )

    # -- LightningModule.log, as the loop's metric store --------------------------------

    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool | None = None,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None, metric_attribute: str | None = None,
            rank_zero_only: bool = False) -> None:
        """``LightningModule.log`` under the loop: train hooks log on step, validation hooks on epoch."""
        if reduce_fx not in ("mean", torch.mean):
            raise UserError(f"self.log({name!r}, reduce_fx={reduce_fx!r}): the Fabric loop reduces by mean only")
        value = torch.as_tensor(value).detach()
        if not torch.is_floating_point(value) or value.dtype not in (torch.float32, torch.float64):
            value = value.to(torch.get_default_dtype())
        if self.training and not on_epoch:
            self.callback_metrics[name] = value
            return
        bs = 1 if batch_size is None else int(batch_size)
        mean = self._epoch_means.get(name)
        if mean is None:
            mean = self._epoch_means[name] = _EpochMean(torch.zeros((), device=value.device),
                                                        torch.zeros((), dtype=torch.long), sync_dist)
        mean.total = mean.total + value * bs
        mean.count = mean.count + bs

    def close_epoch_metrics(self) -> dict[str, torch.Tensor]:
        """Reduce the epoch-level values logged since the last call (``sync_dist``: mean over ranks of both sums)."""
        out = {}
        for name, mean in self._epoch_means.items():
            total, count = mean.total.clone(), mean.count.to(mean.total.device).clone()  # all_reduce is in place
            if mean.sync and self.world_size > 1:
                total = self.fabric.all_reduce(total, reduce_op="mean")
                count = self.fabric.all_reduce(count, reduce_op="mean")
            out[name] = total / count
        self._epoch_means = {}
        self.callback_metrics.update(out)
        return out

    def write_logs(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        """Rank 0 hands ``metrics`` (scalars, plus ``epoch``) to every logger, as Lightning's logger connector."""
        if not metrics or not self.loggers or not self.is_global_zero:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars.setdefault("epoch", self.current_epoch)
        self.logged_metrics.update(metrics)
        for logger in self.loggers:
            logger.log_metrics(metrics=scalars, step=step)
            logger.save()


def call_hook(view: TrainerView, name: str, *args: Any, module: bool = True) -> None:
    """A hook on every callback (the view as ``trainer``), then on the module: Lightning's order.

    Reads ``view.callbacks`` at each call: a datamodule may add one in ``setup`` (``StreamAck``).
    """
    for callback in list(view.callbacks):
        getattr(callback, name)(view, view.lightning_module, *args)
    if module and hasattr(view.lightning_module, name):
        getattr(view.lightning_module, name)(*args)
