"""Your own training loop, over the project's modules, data, callbacks and checkpoints: copy this file, edit ``train``.

    python examples/fabric_custom_loop.py --config configs/eagle3-tiny.yaml [--trainer.max_steps=40] [--ckpt_path=last]

The command line is the ``fabric`` command's, which is ``fit``'s: the same recipe, overrides,
``--trainer.callbacks+=...`` and checkpoint/resume/preemption groups. ``build`` (from
``specforge_lightning.fabric.command``) parses it and wires the pieces: the ``Fabric``, the
algorithm's LightningModule, the datamodule, the callbacks and a ``TrainerView``, the object
the module and callbacks see as ``trainer``. Everything after that is this file's loop.

What it keeps, so that its checkpoints are ``fit``'s (``fit --ckpt_path=last`` resumes one, and
this loop resumes a ``fit`` checkpoint):

* the hooks, called through ``call_hook`` in the Trainer's order: ResumeState records the data
  position and RNG, SpecForgeCheckpoint saves (cadence, best, final), GracefulPreemption stops;
* ``view.progress``, counted as Lightning counts batches and optimizer steps: ``dump_checkpoint``
  writes it as Lightning's loop state;
* ``training_step`` -> ``backward(loss / A)`` without gradient sync while accumulating, then
  ``on_before_optimizer_step`` (DFlash rescales by the token count of all ranks there) -> clip -> step.

What it leaves out next to ``specforge_lightning/fabric/loop.py`` (the full loop the ``fabric``
command runs): validation is every ``trainer.val_check_interval`` batches when that is an int,
else at each epoch end, and ``check_val_every_n_epoch`` is not read. Places to edit say EDIT.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric import Fabric

from specforge_lightning.callbacks import SpecForgeCheckpoint, find_best_checkpoint, find_last_checkpoint
from specforge_lightning.fabric import TrainerView
from specforge_lightning.fabric.checkpoint import dump_checkpoint, restore_modules, restore_training
from specforge_lightning.fabric.command import build
from specforge_lightning.fabric.loop import lookahead
from specforge_lightning.fabric.view import call_hook


def read(view: TrainerView, ckpt_path: str | None) -> dict[str, Any] | None:
    """The checkpoint to resume from: a file, or ``last``/``best`` in the run's checkpoint folder."""
    if ckpt_path in ("last", "best"):
        saver = next(c for c in view.callbacks if isinstance(c, SpecForgeCheckpoint))
        find = find_last_checkpoint if ckpt_path == "last" else find_best_checkpoint
        ckpt_path = find(saver.checkpoint_dir(view))  # None: nothing saved yet, start fresh
    if ckpt_path is None:
        return None
    view.ckpt_path = ckpt_path
    return view.strategy.checkpoint_io.load_checkpoint(ckpt_path)


def next_epoch(p: Any) -> None:
    """Lightning's counters as a new epoch starts (``p`` is ``view.progress``)."""
    p.epoch, p.batch_in_epoch, p.steps_in_epoch, p.val_batches_in_epoch, p.last_batch = p.epoch + 1, 0, 0, 0, False


def validate(fabric: Fabric, view: TrainerView, model: Any, optimizer: Any, log_step: int) -> None:
    """One pass over the validation loader; metrics reach ``callback_metrics`` (best tracking) and the loggers."""
    loader, limit, p = view.datamodule.val_dataloader(), view.settings.limit_val_batches, view.progress
    if isinstance(limit, int):
        loader = itertools.islice(loader, limit)
    view.training = False
    model.eval()
    optimizer.zero_grad()
    call_hook(view, "on_validation_start")
    call_hook(view, "on_validation_epoch_start")
    count = 0
    with torch.inference_mode():
        for index, batch in enumerate(loader):
            batch = fabric.to_device(batch)
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


def train(fabric: Fabric, view: TrainerView, ckpt_path: str | None = None) -> None:
    """``Trainer.fit``, written out: setup, restore, optimizer, then epochs of (accumulated) steps."""
    module, dm, s = view.lightning_module, view.datamodule, view.settings
    fabric.launch()
    module.trainer, module.log, dm.trainer = view, view.log, view  # self.trainer / self.log answer from here
    if fabric.local_rank == 0:
        dm.prepare_data()
    fabric.barrier()
    dm.setup("fit")
    call_hook(view, "setup", "fit")  # the module builds its draft here
    checkpoint = read(view, ckpt_path)
    if checkpoint is not None:
        restore_modules(view, checkpoint)  # weights, data position, callback states
    model = fabric.setup_module(module)
    module._fabric = None  # else Fabric's wrapper would answer self.trainer instead of the view
    config = module.configure_optimizers()  # EDIT: or build your own optimizer and scheduler here
    optimizer = fabric.setup_optimizers(config["optimizer"])
    scheduler = config.get("lr_scheduler", {}).get("scheduler")
    if checkpoint is not None:
        restore_training(view, checkpoint, optimizer, scheduler)  # optimizer, schedule, loop position

    p = view.progress  # read after restore_training, which replaces it

    def save(path: str) -> None:  # what SpecForgeCheckpoint calls: every rank gathers, rank 0 writes
        state = dump_checkpoint(view, optimizer.optimizer, scheduler)
        if fabric.is_global_zero:
            view.strategy.checkpoint_io.save_checkpoint(state, path)
        fabric.barrier()

    view.save_checkpoint_fn = save
    call_hook(view, "on_fit_start")
    if view.train_dataloader is None:  # configure_optimizers may have made it (estimated_stepping_batches)
        view.train_dataloader = dm.train_dataloader()
    loader = view.train_dataloader
    call_hook(view, "on_train_start")  # ResumeState restores the RNG here
    A, every, log_every = s.accumulate_grad_batches, s.val_check_interval, s.log_every_n_steps

    def done() -> bool:  # EDIT: your own stopping rule
        return view.should_stop or (s.max_steps != -1 and p.global_step >= s.max_steps)

    try:
        while not done() and (s.max_epochs == -1 or p.epoch < s.max_epochs):
            if p.last_batch:  # resumed at an epoch's end: the next epoch starts
                next_epoch(p)
                continue
            model.train()
            call_hook(view, "on_train_epoch_start")
            for batch, is_last in lookahead(loader):
                batch, index = fabric.to_device(batch), p.batch_in_epoch
                p.batch_in_epoch, p.total_batches, p.last_batch = index + 1, p.total_batches + 1, is_last
                stepping = p.batch_in_epoch % A == 0 or is_last
                call_hook(view, "on_train_batch_start", batch, index)
                with fabric.no_backward_sync(model, enabled=not stepping):
                    loss = model.training_step(batch, index)  # EDIT: your loss, extra terms, ...
                    if index % A == 0:
                        optimizer.zero_grad()
                    fabric.backward(loss / A)
                if stepping:
                    call_hook(view, "on_before_optimizer_step", optimizer.optimizer)
                    module.configure_gradient_clipping(optimizer.optimizer, view.gradient_clip_val,
                                                       view.gradient_clip_algorithm)
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    p.global_step, p.steps_in_epoch = p.global_step + 1, p.steps_in_epoch + 1
                call_hook(view, "on_train_batch_end", {"loss": (loss / A).detach()}, batch, index)  # saves here
                if stepping and (view.should_stop or (log_every > 0 and p.global_step % log_every == 0)):
                    metrics = {k: v for k, v in view.callback_metrics.items() if k.startswith("train/")}
                    view.write_logs(metrics, p.global_step - 1)
                # EDIT: when to validate (a stop validates first, as under the Trainer).
                if view.should_stop or (p.total_batches % every == 0 if isinstance(every, int) else is_last):
                    validate(fabric, view, model, optimizer, p.global_step - 1 if stepping else p.global_step)
                if done():
                    break
            call_hook(view, "on_train_epoch_end")
            if p.last_batch and not done():
                next_epoch(p)
        call_hook(view, "on_train_end")  # SpecForgeCheckpoint writes the final checkpoint if it has not
        call_hook(view, "on_fit_end")
    except BaseException as exception:
        call_hook(view, "on_exception", exception, module=False)
        raise
    finally:
        call_hook(view, "teardown", "fit", module=False)
        dm.teardown("fit")


def main(args: Sequence[str]) -> None:
    saved = sys.argv
    sys.argv = [saved[0] if saved else "fabric_custom_loop.py", *args]  # Fabric's DDP launcher re-runs this line
    try:
        loop, ckpt_path = build(args)  # the recipe, parsed and wired as the fabric command does
        train(loop.fabric, loop.view, ckpt_path)
        if loop.fabric.is_global_zero:
            print(f"custom loop: trained to optimizer step {loop.view.global_step} in {loop.view.default_root_dir}")
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main(sys.argv[1:])
