"""The resume rule on the command line: the config given now wins; ResumeState refuses what may not change.

``ConfigWinsCLI`` is the one-method LightningCLI change that cli.py needs (it turns
off LightningCLI's merge of checkpoint hyperparameters over the command line).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from specforge_lightning.callbacks import ResumeMismatchError
from specforge_lightning.datamodules import FeatureDataModule
from tests.integration.scripts.common import prepare_config, read_rows

MODEL = "specforge_lightning.algorithms.eagle3.module.Eagle3Module"


class ConfigWinsCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        """Resume rule: never merge checkpoint hyperparameters over the command line."""


def write_config(tmp_path: Path, features: Path, max_steps: int) -> Path:
    prepare = {k: v for k, v in asdict(prepare_config(features)).items() if k != "extra"}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {"class_path": "tests.integration.scripts.common.SampleLog",
                 "init_args": {"path": str(tmp_path / f"rows-{max_steps}.jsonl"), "draw_random": False}},
                {"class_path": "specforge_lightning.callbacks.GracefulPreemption"},
                {"class_path": "specforge_lightning.callbacks.ResumeState"},
                {"class_path": "specforge_lightning.callbacks.SpecForgeCheckpoint",
                 "init_args": {"every_n_train_steps": 3}},
            ],
        },
        "model": {"class_path": MODEL, "init_args": {"ttt_length": 3}},
        "data": {"class_path": "specforge_lightning.datamodules.FeatureDataModule",
                 "init_args": {"batch_size": 2, "auto_prepare": False, "prepare": prepare}},
    }
    path = tmp_path / f"config-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(cls, args: list[str]):
    return cls(L.LightningModule, FeatureDataModule, subclass_mode_model=True, subclass_mode_data=True,
               save_config_kwargs={"overwrite": True}, args=args)


def test_fit_ckpt_path_last_resumes_into_the_same_log_dir_through_the_cli(features, tmp_path):
    from specforge_lightning.cli import main

    main(["fit", "--config", str(write_config(tmp_path, features, 4))])
    assert (tmp_path / "run" / "config.yaml").is_file()
    main(["fit", "--config", str(write_config(tmp_path, features, 6)), "--ckpt_path", "last"])
    assert [r["step"] for r in read_rows(tmp_path / "rows-6.jsonl")] == [5, 6]  # resumed, not restarted
    assert json.loads((tmp_path / "run" / "checkpoints" / "last.json").read_text())["step"] == 6


@pytest.fixture()
def four_steps(features, tmp_path):
    run_cli(ConfigWinsCLI, ["fit", "--config", str(write_config(tmp_path, features, 4))])
    return str(tmp_path / "run" / "checkpoints" / "step-00000004.ckpt")


def test_changed_loss_option_on_the_command_line_is_refused(features, tmp_path, four_steps):
    config = str(write_config(tmp_path, features, 6))
    with pytest.raises(ResumeMismatchError, match="ttt_length: checkpoint 3, this run 2"):
        run_cli(ConfigWinsCLI, ["fit", "--config", config, "--model.init_args.ttt_length", "2", "--ckpt_path", four_steps])


def test_other_changes_on_the_command_line_win(features, tmp_path, four_steps):
    config = str(write_config(tmp_path, features, 6))
    cli = run_cli(ConfigWinsCLI, ["fit", "--config", config, "--model.init_args.lr", "0.002", "--ckpt_path", four_steps])
    assert cli.model.hparams.lr == 0.002 and cli.trainer.global_step == 6


def test_stock_lightning_cli_silently_prefers_the_checkpoint(features, tmp_path, four_steps):
    """Why cli.py needs ConfigWinsCLI: stock LightningCLI replaces the command-line value without a word."""
    config = str(write_config(tmp_path, features, 6))
    cli = run_cli(LightningCLI, ["fit", "--config", config, "--model.init_args.ttt_length", "2", "--ckpt_path", four_steps])
    assert cli.model.hparams.ttt_length == 3
