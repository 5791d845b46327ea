"""DFlash resumes exactly through the CLI: interrupted + ``--ckpt_path last`` ends with the straight run's weights.

Anchors are seeded by (anchor_seed, step, sample id) and the loader restores its
position, so the resumed steps draw the same anchors on the same samples.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from tests.integration.scripts.common import KeyboardInterruptLike, make_features, prepare_config, read_rows

MAX_STEPS = 6


def write_config(root: Path, features: Path, interrupt_at: int | None) -> Path:
    prepare = {k: v for k, v in asdict(prepare_config(features)).items() if k != "extra"}
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
            "limit_val_batches": 0, "default_root_dir": str(root / "run"), "callbacks": callbacks,
        },
        "model": {"class_path": "specforge_lightning.algorithms.dflash.DFlashModule",
                  "init_args": {"block_size": 4, "num_anchors": 6, "lr": 1e-2, "warmup_ratio": 0.2}},
        "data": {"class_path": "specforge_lightning.datamodules.FeatureDataModule",
                 "init_args": {"batch_size": 2, "auto_prepare": False, "prepare": prepare}},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("draft.")}


def test_interrupted_and_resumed_fit_matches_the_straight_run(tmp_path):
    from specforge_lightning.cli import main

    torch.set_num_threads(1)
    features = tmp_path / "features"
    make_features(features)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    main(["fit", "--config", str(write_config(straight, features, None))])
    with pytest.raises(KeyboardInterruptLike):
        main(["fit", "--config", str(write_config(resumed, features, interrupt_at=3))])
    main(["fit", "--config", str(write_config(resumed, features, None)), "--ckpt_path", "last"])

    a, b = read_rows(straight / "rows.jsonl"), read_rows(resumed / "rows.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 3, 4, 5, 6]  # step 3 is redone from the step-2 checkpoint
    by_step = {r["step"]: r for r in b[3:]}
    for r in a[2:]:  # the same samples and the same losses after the resume
        assert by_step[r["step"]]["ids"] == r["ids"] and by_step[r["step"]]["loss"] == r["loss"]
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
