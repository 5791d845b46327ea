"""The Fabric loop's checkpoints, in the Trainer's format: either loop resumes the other's files.

A checkpoint is written at an optimizer boundary only, so its loop state is always the one
Lightning writes from ``on_train_batch_end`` after an optimizer step: the batch is
started/processed but not yet completed, and ``_batches_that_stepped`` not yet counted.
``loop_state`` builds that nested dict from ``Progress``; ``progress_from`` reads it back
from a file written by either loop. Everything else (weights, optimizer, scheduler,
callback states, the datamodule's state, ``specforge_resume`` from ``ResumeState``, the
algorithm's own keys) is added by the same code the Trainer runs.
"""

from __future__ import annotations

from typing import Any

import lightning

from specforge_lightning.fabric.view import Progress, TrainerView, call_hook


def _counts(n: int, completed: int | None = None, started: bool = True) -> dict[str, int]:
    out = {"ready": n, "completed": n if completed is None else completed}
    if started:
        out.update(started=n, processed=n)
    return out


def _batch_progress(total: int, current: int, last: bool, completed_lag: int = 0) -> dict[str, Any]:
    return {
        "total": _counts(total, total - completed_lag),
        "current": _counts(current, current - completed_lag),
        "is_last_batch": last,
    }


def _steps(total: int, current: int) -> dict[str, Any]:
    return {"total": {"ready": total, "completed": total}, "current": {"ready": current, "completed": current}}


def _empty_loop(with_last: bool = True) -> dict[str, Any]:
    progress = {"total": _counts(0), "current": _counts(0)}
    if with_last:
        progress["is_last_batch"] = False
    return {"state_dict": {}, "batch_progress": progress}


def loop_state(p: Progress) -> dict[str, Any]:
    """Lightning 2.x ``checkpoint["loops"]`` at the end of the train batch that made optimizer step ``p.global_step``."""
    zero_grad = {k: {**v, "started": v["ready"]} for k, v in _steps(p.global_step, p.steps_in_epoch).items()}
    fit = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": p.global_step - 1},
        "epoch_loop.batch_progress": _batch_progress(p.total_batches, p.batch_in_epoch, p.last_batch, completed_lag=1),
        "epoch_loop.scheduler_progress": _steps(p.global_step, p.steps_in_epoch),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {
            "optimizer": {"step": _steps(p.global_step, p.steps_in_epoch), "zero_grad": zero_grad},
        },
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": _steps(0, 0),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {
            "total": _counts(p.val_batches_in_epoch), "current": _counts(p.val_batches_last), "is_last_batch": p.validated,
        },
        "epoch_progress": {
            "total": {"ready": p.epoch + 1, "completed": p.epoch, "started": p.epoch + 1, "processed": p.epoch},
            "current": {"ready": p.epoch + 1, "completed": p.epoch, "started": p.epoch + 1, "processed": p.epoch},
        },
    }
    predict = _empty_loop(with_last=False)
    return {"fit_loop": fit, "validate_loop": _empty_loop(), "test_loop": _empty_loop(), "predict_loop": predict}


def progress_from(checkpoint: dict[str, Any]) -> Progress:
    """The loop position of a checkpoint written by the Trainer or by the Fabric loop."""
    fit = checkpoint["loops"]["fit_loop"]
    batches = fit["epoch_loop.batch_progress"]
    steps = fit["epoch_loop.scheduler_progress"]
    val = fit["epoch_loop.val_loop.batch_progress"]
    return Progress(
        epoch=int(checkpoint["epoch"]),
        global_step=int(checkpoint["global_step"]),
        batch_in_epoch=int(batches["current"]["ready"]),
        total_batches=int(batches["total"]["ready"]),
        steps_in_epoch=int(steps["current"]["ready"]),
        val_batches_in_epoch=int(val["total"]["ready"]),
        val_batches_last=int(val["current"]["ready"]),
        validated=bool(val.get("is_last_batch", False)),
        last_batch=bool(batches.get("is_last_batch", False)),
    )


def dump_checkpoint(view: TrainerView, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """The checkpoint dict ``Trainer.save_checkpoint`` would build at this point (on every rank)."""
    module, datamodule = view.lightning_module, view.datamodule
    checkpoint: dict[str, Any] = {
        "epoch": view.current_epoch,
        "global_step": view.global_step,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": module.state_dict(),
        "loops": loop_state(view.progress),
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()] if scheduler is not None else [],
        "callbacks": {},
    }
    for callback in view.callbacks:
        state = callback.state_dict()
        if state:
            checkpoint["callbacks"][callback.state_key] = state
    dm_state = datamodule.state_dict() if datamodule is not None else None
    if dm_state:
        checkpoint[type(datamodule).__qualname__] = dm_state
    if getattr(module, "_hparams_name", None):
        checkpoint["hparams_name"] = module._hparams_name
        checkpoint["hyper_parameters"] = dict(module.hparams)
    call_hook(view, "on_save_checkpoint", checkpoint)  # ResumeState: per-rank data position and RNG
    return checkpoint


def restore_modules(view: TrainerView, checkpoint: dict[str, Any]) -> None:
    """Weights, datamodule and callback states, in the Trainer's order (before the optimizer exists)."""
    module, datamodule = view.lightning_module, view.datamodule
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    if datamodule is not None and type(datamodule).__qualname__ in checkpoint:
        datamodule.load_state_dict(checkpoint[type(datamodule).__qualname__])
    states = checkpoint.get("callbacks", {})
    for callback in view.callbacks:
        callback.on_load_checkpoint(view, module, checkpoint)
    for callback in view.callbacks:
        state = states.get(callback.state_key)
        if state:
            callback.load_state_dict(state)


def restore_training(view: TrainerView, checkpoint: dict[str, Any], optimizer: Any, scheduler: Any) -> None:
    """Optimizer, scheduler and loop position."""
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    if scheduler is not None and checkpoint.get("lr_schedulers"):
        scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
    view.progress = progress_from(checkpoint)
