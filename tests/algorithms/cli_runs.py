"""CLI runs the algorithm tests share: a tiny fit's logged rows, and the interrupted-then-resumed exactness check."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from specforge_lightning.cli import main
from tests.integration.scripts.common import KeyboardInterruptLike, prepare_config, read_rows

MAX_STEPS = 6

WriteConfig = Callable[[Path, "int | None"], Path]
"""``(root, interrupt_at) -> config path``: one algorithm's resume run, interrupted at a step or not."""


def fit_tiny(config: str, features: Path, run: Path, *overrides: str) -> list[dict[str, str]]:
    """``fit`` a tiny config with a CSV logger writing every step; returns the rows of its ``metrics.csv``."""
    main([
        "fit", "--config", config,
        f"--data.init_args.prepare.output_dir={features}",
        f"--trainer.default_root_dir={run}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.enable_progress_bar=false",
        *overrides, "--trainer.log_every_n_steps=1",
    ])
    (metrics,) = run.glob("lightning_logs/version_*/metrics.csv")
    return list(csv.DictReader(metrics.open()))


def logged(rows: list[dict[str, str]], key: str) -> list[float]:
    """Every value logged under ``key``, in step order."""
    return [float(r[key]) for r in rows if r.get(key)]


def feature_data(features: Path) -> dict[str, Any]:
    """The ``data:`` section over synthetic features made by ``make_features`` (never prepared again)."""
    prepare = {k: v for k, v in asdict(prepare_config(features)).items() if k != "extra"}
    return {"class_path": "specforge_lightning.datamodules.FeatureDataModule",
            "init_args": {"batch_size": 2, "auto_prepare": False, "prepare": prepare}}


def write_resume_config(
    root: Path, interrupt_at: int | None, model: dict[str, Any], data: dict[str, Any], **trainer: Any
) -> Path:
    """A CPU fit of MAX_STEPS that logs each step's samples, checkpoints every 2 steps and maybe interrupts."""
    callbacks = [
        {"class_path": "tests.integration.scripts.common.SampleLog",
         "init_args": {"path": str(root / "rows.jsonl"), "draw_random": False}},
        {"class_path": "specforge_lightning.callbacks.ResumeState"},
        {"class_path": "specforge_lightning.callbacks.SpecForgeCheckpoint", "init_args": {"every_n_train_steps": 2}},
    ]
    if interrupt_at is not None:
        callbacks.append({"class_path": "tests.integration.scripts.common.Interrupt", "init_args": {"step": interrupt_at}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "logger": False, "precision": "32-true",
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 0, "default_root_dir": str(root / "run"), "callbacks": callbacks, **trainer,
        },
        "model": model,
        "data": data,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("draft.")}


def assert_resume_matches_straight(tmp_path: Path, write_config: WriteConfig) -> dict[str, torch.Tensor]:
    """A straight fit vs one interrupted at step 3 and resumed from ``last``: same samples, losses and weights.

    Returns the straight run's draft weights, for the caller's checks of which modules they hold.
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    main(["fit", "--config", str(write_config(straight, None))])
    with pytest.raises(KeyboardInterruptLike):
        main(["fit", "--config", str(write_config(resumed, 3))])
    main(["fit", "--config", str(write_config(resumed, None)), "--ckpt_path", "last"])

    a, b = read_rows(straight / "rows.jsonl"), read_rows(resumed / "rows.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 3, 4, 5, 6]  # step 3 is redone from the step-2 checkpoint
    by_step = {r["step"]: r for r in b[3:]}
    for r in a[2:]:  # the same samples (and random draws) and the same losses after the resume
        assert by_step[r["step"]]["ids"] == r["ids"] and by_step[r["step"]]["loss"] == r["loss"]
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    return wa
