"""Shared pieces of the resume tests: tiny features written directly, a trainer builder, recording callbacks.

Features are random tensors in the prepared-shard format (no target forward), all
of one length so that micro-batches and full batches normalise the loss alike.
The tiny-llama target folder is still needed: Eagle3Module reads its config,
embedding and head from it.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from specforge_lightning.callbacks import GracefulPreemption, ResumeState, SpecForgeCheckpoint
from specforge_lightning.datamodules import FeatureDataModule
from specforge_lightning.data.stores.shards import write_shard
from specforge_lightning.data.vocab import build_vocab_mapping, save_vocab_mapping
from specforge_lightning.target.identity import target_identity
from specforge_lightning.target.prepare import PrepareConfig
from specforge_lightning.target.zoo import resolve_target

TARGET = "tiny-llama"


def prepare_config(features: str | Path, num_train: int = 24, num_val: int = 8, seq_len: int = 32) -> PrepareConfig:
    return PrepareConfig(
        output_dir=str(features), target=TARGET, corpus="random", num_samples=num_train, num_val_samples=num_val,
        max_length=seq_len, draft_vocab_size=64, capture_dtype="float32", compute_dtype="float32", shard_size=64,
        layer_preset="eagle3",
    )


def make_features(features: str | Path, num_train: int = 24, num_val: int = 8, seq_len: int = 32, seed: int = 0) -> PrepareConfig:
    """Write a complete prepared-feature folder (shards, vocab mapping, manifest) with random tensors."""
    cfg = prepare_config(features, num_train, num_val, seq_len)
    out = Path(features)
    target_cfg = json.loads((resolve_target(TARGET) / "config.json").read_text())
    hidden, vocab, layers = target_cfg["hidden_size"], target_cfg["vocab_size"], [1, 3, 4]
    g = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    splits = {}
    for split, n in (("train", num_train), ("val", num_val)):
        samples = []
        for i in range(n):
            ids = torch.randint(3, vocab, (seq_len,), generator=g)
            mask = (torch.rand(seq_len, generator=g) < 0.6).long()
            mask[:2] = 1
            if split == "train":
                counts.update(t for t, m in zip(ids.tolist(), mask.tolist()) if m)
            samples.append((f"{split}{i:03d}", {
                "input_ids": ids, "loss_mask": mask,
                "aux_hidden_states": torch.randn(seq_len, len(layers) * hidden, generator=g),
                "last_hidden_state": torch.randn(seq_len, hidden, generator=g),
            }))
        rel = f"{split}/shard_00000.safetensors"
        write_shard(out / rel, samples, {"split": split, "target": TARGET})
        splits[split] = {"shards": [rel], "num_samples": n, "num_tokens": n * seq_len, "num_supervised": 0}
    d2t, t2d = build_vocab_mapping(counts, vocab, cfg.draft_vocab_size)
    save_vocab_mapping(out / "vocab_mapping.safetensors", d2t, t2d)
    manifest = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "extra", "cache_dir", "batch_size")},
        "schema_version": 1, "layer_ids": layers, **target_identity(resolve_target(TARGET)),
        "format": "specforge-features", "target_id": TARGET, "hidden_size": hidden,
        "num_layers": target_cfg["num_hidden_layers"], "vocab_size": vocab,
        "vocab_mapping": "vocab_mapping.safetensors", "complete": True, "splits": splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return cfg


class SampleLog(L.Callback):
    """Records what each micro-batch trained: step after it, epoch, batch index, sample ids, loss.

    With ``path`` every line is flushed and fsynced at once, so a SIGKILL loses nothing written.
    """

    def __init__(self, path: str | None = None, draw_random: bool = True) -> None:
        self.path = path
        self.draw_random = draw_random
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Draws from every RNG the trainer may use, so a wrongly restored RNG shows up here.
        self._draws = [torch.rand(1).item(), random.random(), float(np.random.rand())] if self.draw_random else []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {
            "rank": trainer.global_rank, "step": trainer.global_step, "epoch": batch.metadata["epoch"],
            "batch_index": batch.metadata["batch_index"], "ids": list(batch.sample_ids),
            "loss": float(outputs["loss"]), "rng": self._draws, "lightning_epoch": trainer.current_epoch,
        }
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())


class Interrupt(L.Callback):
    """At optimizer step ``step`` (after it): SIGKILL this process, send it ``signal_name``, or raise (in-process)."""

    def __init__(self, step: int, action: str = "raise", ranks: tuple[int, ...] | None = None) -> None:
        self.step, self.action, self.ranks = step, action, ranks
        self.fired = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.fired or trainer.global_step != self.step:
            return
        if self.ranks is not None and trainer.global_rank not in self.ranks:
            return
        self.fired = True
        if self.action == "raise":
            raise KeyboardInterruptLike(f"interrupted at step {self.step}")
        os.kill(os.getpid(), getattr(signal, self.action))


class KeyboardInterruptLike(RuntimeError):
    """Stands in for a crash in in-process tests (Lightning re-raises it after its on_exception hooks)."""


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def build_trainer(
    root: str | Path,
    *,
    devices: int = 1,
    max_steps: int = 12,
    accumulate: int = 1,
    every_n: int = 5,
    keep_last: int = 3,
    callbacks: list[L.Callback] | None = None,
    checkpoint: bool = True,
    **trainer_kwargs: Any,
) -> L.Trainer:
    cbs = list(callbacks or [])
    if checkpoint:
        cbs += [GracefulPreemption(), ResumeState(), SpecForgeCheckpoint(every_n_train_steps=every_n, keep_last=keep_last)]
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=cbs,
        enable_checkpointing=checkpoint,
        **trainer_kwargs,
    )


def build_module(ttt_length: int = 3, **kwargs: Any):
    from specforge_lightning.algorithms.eagle3.module import Eagle3Module

    return Eagle3Module(ttt_length=ttt_length, **kwargs)


def build_data(features: str | Path, batch_size: int = 2, **kwargs: Any) -> FeatureDataModule:
    cfg = prepare_config(features)
    return FeatureDataModule(prepare=cfg, batch_size=batch_size, auto_prepare=False, **kwargs)


def weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit(
    features: str | Path,
    root: str | Path,
    *,
    max_steps: int = 16,
    max_epochs: int | None = None,
    batch_size: int = 2,
    accumulate: int = 1,
    every_n: int = 5,
    ckpt_path: str | None = None,
    interrupt: L.Callback | None = None,
    module_kwargs: dict[str, Any] | None = None,
    data_kwargs: dict[str, Any] | None = None,
    resume: ResumeState | None = None,
    module: L.LightningModule | None = None,
    data: FeatureDataModule | None = None,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], L.Trainer]:
    """One seeded in-process run with the three callbacks; returns (rows trained, final weights, trainer).

    A ``KeyboardInterruptLike`` from ``interrupt`` stands in for a crash: the run just ends there.
    """
    L.seed_everything(0, verbose=False)
    log = SampleLog()
    callbacks = [log] + ([interrupt] if interrupt else [])
    callbacks += [GracefulPreemption(), resume or ResumeState(), SpecForgeCheckpoint(every_n_train_steps=every_n)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=max_epochs, accumulate_grad_batches=accumulate,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(root), callbacks=callbacks,
    )
    module = module or build_module(**(module_kwargs or {}))
    data = data or build_data(features, batch_size=batch_size, **(data_kwargs or {}))
    try:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    except KeyboardInterruptLike:
        pass
    return log.rows, weights(module), trainer


def key(rows: list[dict[str, Any]]) -> list[tuple]:
    """What identifies a micro-batch's place in training (the loss and RNG draws are compared apart)."""
    return [(r["step"], r["epoch"], r["batch_index"], r["ids"], r["lightning_epoch"]) for r in rows]


def assert_same(resumed: list[dict[str, Any]], straight: list[dict[str, Any]], upto: int) -> None:
    """``resumed`` equals the micro-batches of ``straight`` after optimizer step ``upto``."""
    done = min(i + 1 for i, r in enumerate(straight) if r["step"] == upto) if upto else 0  # the completing one
    tail = straight[done:]
    assert key(resumed) == key(tail)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in tail]
    assert [r["rng"] for r in resumed] == [r["rng"] for r in tail]
