"""Shared pieces of the Fabric tests: tiny features, a Trainer run and a Fabric run on the same samples.

Both runs get the same seed, module, datamodule and recording callback, so their per-micro-batch
rows (step, sample ids, loss, RNG draws) and final weights can be compared for equality.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric import Fabric

from specforge_lightning.callbacks import GracefulPreemption, ResumeState, SpecForgeCheckpoint
from specforge_lightning.fabric import FabricLoop, LoopSettings
from specforge_lightning.target.identity import target_identity
from specforge_lightning.target.zoo import resolve_target
from tests.integration.scripts.common import (
    TARGET,
    SampleLog,
    build_data,
    build_module,
    make_features,
    weights,
)


def features(folder: str | Path, **kwargs: Any) -> Path:
    """``make_features`` with the tiny target's real identity hashes in the manifest."""
    make_features(folder, **kwargs)
    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(target_identity(resolve_target(TARGET)))
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Path(folder)


def module_for(algorithm: str) -> L.LightningModule:
    if algorithm == "eagle3":
        return build_module()
    from specforge_lightning.algorithms.dflash import DFlashModule

    return DFlashModule(num_anchors=4, block_size=4, objective_chunk_rows=0)


def checkpoint_callbacks(every_n: int) -> list[L.Callback]:
    return [GracefulPreemption(), ResumeState(), SpecForgeCheckpoint(every_n_train_steps=every_n)]


def run_trainer(feats: Path, root: Path, algorithm: str, *, max_steps: int, accumulate: int = 2, every_n: int = 0,
                ckpt_path: str | None = None, checkpoint: bool = False, callbacks: list | None = None,
                devices: int = 1) -> tuple[list[dict], dict[str, torch.Tensor], L.Trainer]:
    L.seed_everything(0, verbose=False)
    log = SampleLog()
    cbs = [log, *(callbacks or [])] + (checkpoint_callbacks(every_n) if checkpoint else [])
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=max_steps,
        accumulate_grad_batches=accumulate, gradient_clip_val=0.5, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root), callbacks=cbs,
        enable_checkpointing=checkpoint,
    )
    module = module_for(algorithm)
    trainer.fit(module, build_data(feats), ckpt_path=ckpt_path)
    return log.rows, weights(module), trainer


def run_fabric(feats: Path, root: Path, algorithm: str, *, max_steps: int, accumulate: int = 2, every_n: int = 0,
               ckpt_path: str | None = None, checkpoint: bool = False, callbacks: list | None = None,
               devices: int = 1) -> tuple[list[dict], dict[str, torch.Tensor], FabricLoop]:
    L.seed_everything(0, verbose=False)
    log = SampleLog()
    cbs = [log, *(callbacks or [])] + (checkpoint_callbacks(every_n) if checkpoint else [])
    fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", precision="32-true")
    settings = LoopSettings(max_steps=max_steps, accumulate_grad_batches=accumulate, gradient_clip_val=0.5,
                            default_root_dir=str(root))
    module = module_for(algorithm)
    loop = FabricLoop(fabric, module, build_data(feats), settings, callbacks=cbs)
    loop.fit(ckpt_path=ckpt_path)
    return log.rows, weights(module), loop


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Sigterm(L.Callback):
    """Sends this process SIGTERM on the first micro-batch of optimizer step ``step`` (mid-accumulation)."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step == self.step - 1:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def tail_after(rows: list[dict], step: int) -> list[dict]:
    """The micro-batches that trained after optimizer step ``step`` (the first row at ``step`` completed it)."""
    done = min(i for i, r in enumerate(rows) if r["step"] == step) + 1
    return rows[done:]


def same_rows(a: list[dict], b: list[dict]) -> bool:
    fields = ("step", "epoch", "batch_index", "ids", "loss", "rng")
    return [tuple(str(r[k]) for k in fields) for r in a] == [tuple(str(r[k]) for k in fields) for r in b]
