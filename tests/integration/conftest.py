"""Shared pieces of the integration tests: the real mooncake_master fixture, the tiny-target
feature config, and a small Lightning fit that records per-step losses and sample ids."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch

from specforge_lightning.target.prepare import PrepareConfig
from tests.data.stores.conftest import mooncake_master  # noqa: F401  (the fixture, shared)

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def tiny_prepare(output_dir: str | Path = "unused", **kw) -> PrepareConfig:
    """12 short conversations on the tiny target, fp32 capture, shards of 4 (prepare's batching)."""
    base = dict(
        output_dir=str(output_dir), target="tiny-llama", num_samples=12, num_val_samples=0, max_length=40,
        draft_vocab_size=64, batch_size=4, shard_size=4, capture_dtype="float32", compute_dtype="float32",
        layer_preset="eagle3",
    )
    return PrepareConfig(**{**base, **kw})


class Record(L.Callback):
    """Per-step loss and sample ids of the batch that produced it."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.ids: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.ids.append(list(batch.sample_ids))


def fit(datamodule: L.LightningDataModule, steps: int = STEPS, callbacks=()) -> tuple[Record, dict[str, torch.Tensor]]:
    """Train a seeded EAGLE3 draft for ``steps`` optimizer steps; returns the record and the final weights."""
    from specforge_lightning.algorithms.eagle3 import Eagle3Module

    L.seed_everything(0, verbose=False)
    module = Eagle3Module(ttt_length=2, lr=1e-3)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record, *callbacks],
    )
    trainer.fit(module, datamodule=datamodule)
    return record, {k: v.detach().clone() for k, v in module.draft.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weight {k} differs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "MC_TCP_BIND_ADDRESS": "127.0.0.1", **extra,
    }


def run_script(path: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout,
        env=env or child_env(), cwd=REPO,
    )


@pytest.fixture(scope="session")
def offline_features(tmp_path_factory):
    """The 12 tiny samples prepared once, offline (the reference every topology must reproduce)."""
    from specforge_lightning.target.prepare import prepare

    cfg = tiny_prepare(tmp_path_factory.mktemp("offline") / "feats")
    prepare(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def offline_run(offline_features):
    from specforge_lightning.datamodules import FeatureDataModule

    return fit(FeatureDataModule(prepare=offline_features, batch_size=2, shuffle=False, prefetch=0))


def prepare_dict(cfg: PrepareConfig) -> dict:
    return asdict(cfg)
