"""The Fabric training loop: the Trainer's fit, written out so it reads top to bottom.

Same module, same datamodule, same callbacks, same numbers: ``fit`` runs the hooks the
Trainer runs, in the Trainer's order (setup, restore, optimizer, ``on_fit_start``, the
loader, ``on_train_start``, then batches), and each micro-batch goes

    training_step  ->  backward(loss / A)  [no gradient sync while accumulating]
    at the step:   on_before_optimizer_step (DFlash's token-count rescale) -> clip -> step -> scheduler

Validation follows ``val_check_interval``/``check_val_every_n_epoch`` as the Trainer counts
them; checkpoints come from the run's ``SpecForgeCheckpoint`` (cadence, best, final, atomic)
with ``ResumeState``'s per-rank data position and RNG, in the Trainer's file format.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import ModelCheckpoint

from specforge_lightning.callbacks import SpecForgeCheckpoint, find_best_checkpoint, find_last_checkpoint
from specforge_lightning.errors import UserError
from specforge_lightning.fabric.checkpoint import dump_checkpoint, restore_modules, restore_training
from specforge_lightning.fabric.view import LoopSettings, TrainerView, call_hook


def lookahead(batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """``(batch, is_last)``, fetching one ahead as Lightning's data fetcher does."""
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for upcoming in it:
        yield current, False
        current = upcoming
    yield current, True


class FabricLoop:
    """Trains ``module`` on ``datamodule`` under ``fabric`` exactly as ``Trainer.fit`` would.

    Args:
        fabric: a Fabric (launched by ``fit``).
        module: an algorithm's LightningModule (EAGLE3, DFlash, Domino, ...).
        datamodule: FeatureDataModule or StreamDataModule.
        settings: the Trainer arguments in force (``LoopSettings``).
        callbacks: Lightning callbacks (SpecForgeCheckpoint, ResumeState, GracefulPreemption, yours);
            each hook gets a ``TrainerView`` as ``trainer``.
        loggers: Lightning loggers.

    Example::

        loop = FabricLoop(Fabric(accelerator="cpu"), Eagle3Module(), FeatureDataModule(...),
                          LoopSettings(max_steps=20), callbacks=[SpecForgeCheckpoint(), ResumeState()])
        loop.fit(ckpt_path="last")
    """

    def __init__(self, fabric: Fabric, module: Any, datamodule: Any, settings: LoopSettings,
                 callbacks: Iterable[Any] = (), loggers: Iterable[Any] = ()) -> None:
        # The Trainer runs checkpoint callbacks last, after e.g. preemption decided to stop.
        ordered = sorted(callbacks, key=lambda c: isinstance(c, ModelCheckpoint))
        self.fabric = fabric
        self.view = TrainerView(fabric, settings, module, datamodule, ordered, list(loggers))
        self.module, self.datamodule, self.settings = module, datamodule, settings
        self.optimizer: Any = None
        self.scheduler: Any = None

    # ------------------------------------------------------------------------- fit

    def fit(self, ckpt_path: str | None = None) -> None:
        fabric, view, module, dm = self.fabric, self.view, self.module, self.datamodule
        fabric.launch()
        module.trainer = view  # self.trainer / self.global_step answer from the loop
        module.log = view.log  # LightningModule.log writes into the loop's metrics
        dm.trainer = view
        if fabric.local_rank == 0:
            dm.prepare_data()
        fabric.barrier()
        dm.setup("fit")
        call_hook(view, "setup", "fit")  # callbacks, then module.setup: the draft is built here
        checkpoint = self._read(ckpt_path)  # refused here, before anything is restored, if it is not this run's
        if checkpoint is not None:
            restore_modules(view, checkpoint)
        model = fabric.setup_module(module)
        module._fabric = None  # Fabric's shim would hide the view behind self.trainer
        config = module.configure_optimizers()
        self.optimizer = fabric.setup_optimizers(config["optimizer"])
        self.scheduler = config["lr_scheduler"]["scheduler"] if "lr_scheduler" in config else None
        if checkpoint is not None:
            restore_training(view, checkpoint, self.optimizer, self.scheduler)
        view.save_checkpoint_fn = self._save
        call_hook(view, "on_fit_start")
        if view.train_dataloader is None:
            view.train_dataloader = dm.train_dataloader()
        call_hook(view, "on_train_start")  # ResumeState restores the RNG here
        try:
            while not self._done():
                self._train_epoch(model)
            call_hook(view, "on_train_end")
            call_hook(view, "on_fit_end")
        except BaseException as exception:
            call_hook(view, "on_exception", exception, module=False)
            raise
        finally:
            call_hook(view, "teardown", "fit", module=False)
            dm.teardown("fit")

    # ------------------------------------------------------------------------- epochs and batches

    def _train_epoch(self, model: Any) -> None:
        view, p, s = self.view, self.view.progress, self.settings
        loader, A = view.train_dataloader, s.accumulate_grad_batches
        n = view.num_training_batches
        if p.last_batch or p.batch_in_epoch >= n:  # resumed at the end of an epoch: the next one starts
            p.epoch, p.batch_in_epoch, p.steps_in_epoch, p.val_batches_in_epoch, p.last_batch = p.epoch + 1, 0, 0, 0, False
        model.train()
        call_hook(view, "on_train_epoch_start")
        for batch, is_last in lookahead(loader):
            batch = self.fabric.to_device(batch)
            index = p.batch_in_epoch
            p.batch_in_epoch, p.total_batches, p.last_batch = index + 1, p.total_batches + 1, is_last
            stepping = p.batch_in_epoch % A == 0 or is_last or p.batch_in_epoch == n
            call_hook(view, "on_train_batch_start", batch, index)
            with self.fabric.no_backward_sync(model, enabled=not stepping):
                loss = model.training_step(batch, index)
                if index % A == 0:
                    self.optimizer.zero_grad()
                self.fabric.backward(loss / A)
            outputs = {"loss": (loss / A).detach().clone()}
            if stepping:
                self._optimizer_step()
            call_hook(view, "on_train_batch_end", outputs, batch, index)
            if stepping and self._log_due():
                view.write_logs({k: v for k, v in view.callback_metrics.items() if k.startswith("train/")}, p.global_step - 1)
            if self._val_due(is_last):
                self._validate(model, p.global_step - 1 if stepping else p.global_step)
            if self._done(epoch_finished=False):
                break
        call_hook(view, "on_train_epoch_end")
        if not (p.last_batch or p.batch_in_epoch >= n) or self._done(epoch_finished=False):
            return
        p.epoch, p.batch_in_epoch, p.steps_in_epoch, p.val_batches_in_epoch, p.last_batch = p.epoch + 1, 0, 0, 0, False

    def _optimizer_step(self) -> None:
        view, s, module = self.view, self.settings, self.module
        call_hook(view, "on_before_optimizer_step", self.optimizer.optimizer)  # DFlash: tokens of all ranks
        module.configure_gradient_clipping(self.optimizer.optimizer, view.gradient_clip_val, view.gradient_clip_algorithm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        view.progress.global_step += 1
        view.progress.steps_in_epoch += 1

    # ------------------------------------------------------------------------- when

    def _done(self, epoch_finished: bool = True) -> bool:
        s, p, view = self.settings, self.view.progress, self.view
        if view.should_stop:
            return True
        if s.max_steps != -1 and p.global_step >= s.max_steps:
            return True
        return epoch_finished and s.max_epochs not in (None, -1) and p.epoch >= s.max_epochs

    def _log_due(self) -> bool:
        every = self.settings.log_every_n_steps
        return self.view.should_stop or (every > 0 and self.view.progress.global_step % every == 0)

    def _val_check_batch(self) -> float:
        interval, n = self.settings.val_check_interval, self.view.num_training_batches
        if isinstance(interval, int):
            return interval
        return float("inf") if n == float("inf") else max(1, int(n * interval))

    def _val_due(self, is_last: bool) -> bool:
        s, p, view = self.settings, self.view.progress, self.view
        if self._val_loader() is None:
            return False
        if s.check_val_every_n_epoch is not None and (p.epoch + 1) % s.check_val_every_n_epoch != 0:
            return False
        every = self._val_check_batch()
        if is_last and every == float("inf"):
            return True
        if view.should_stop:
            return True
        if every == float("inf"):
            return is_last
        counted = p.total_batches if s.check_val_every_n_epoch is None else p.batch_in_epoch
        return counted % every == 0

    # ------------------------------------------------------------------------- validation

    def _val_loader(self) -> Any:
        if not hasattr(self, "_val"):
            loader = self.datamodule.val_dataloader()
            limit = self.settings.limit_val_batches
            self._val = None if (isinstance(loader, list) and not loader) or limit == 0 else loader
        return self._val

    def _validate(self, model: Any, log_step: int) -> None:
        view, p = self.view, self.view.progress
        loader, limit = self._val_loader(), self.settings.limit_val_batches
        if isinstance(limit, int):
            loader = itertools.islice(loader, limit)
        elif limit not in (None, 1.0):
            raise UserError(f"trainer.limit_val_batches={limit}: the fabric command takes an int or 1.0")
        view.training = False
        model.eval()
        self.optimizer.zero_grad()  # Lightning: on_validation_model_zero_grad
        call_hook(view, "on_validation_start")
        call_hook(view, "on_validation_epoch_start")
        count = 0
        with torch.inference_mode():
            for index, batch in enumerate(loader):
                batch = self.fabric.to_device(batch)
                outputs = model.validation_step(batch, index)
                call_hook(view, "on_validation_batch_end", outputs, batch, index, 0)
                count += 1
            call_hook(view, "on_validation_epoch_end")
        metrics = view.close_epoch_metrics()
        p.val_batches_last, p.val_batches_in_epoch, p.validated = count, p.val_batches_in_epoch + count, True
        view.write_logs(metrics, log_step)
        call_hook(view, "on_validation_end")
        model.train()
        view.training = True

    # ------------------------------------------------------------------------- checkpoints

    def _checkpoint_dir(self) -> str | None:
        found = next((c for c in self.view.callbacks if isinstance(c, SpecForgeCheckpoint)), None)
        return found.checkpoint_dir(self.view) if found is not None else None

    def _read(self, ckpt_path: str | None) -> dict[str, Any] | None:
        """The checkpoint to resume (``last``/``best`` resolved as ``fit`` does), read and checked."""
        if ckpt_path is None:
            return None
        if ckpt_path in ("last", "best"):
            folder = self._checkpoint_dir()
            path = (find_last_checkpoint if ckpt_path == "last" else find_best_checkpoint)(folder) if folder else None
            if path is None:
                if ckpt_path == "best":
                    raise UserError(f"--ckpt_path best: no best checkpoint under {folder} (no best.json there)")
                return None  # "last" with nothing saved yet starts fresh, as the Trainer does
            ckpt_path = path
        self.view.ckpt_path = ckpt_path
        return self.view.strategy.checkpoint_io.load_checkpoint(ckpt_path)

    def _save(self, path: str) -> None:
        checkpoint = dump_checkpoint(self.view, self.optimizer.optimizer, self.scheduler)
        if self.view.is_global_zero:
            self.view.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        self.fabric.barrier()

