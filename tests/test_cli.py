"""The command line end to end on the tiny target: fit with the shipped config, overrides, errors."""

import csv

import pytest

from specforge_lightning.cli import main


def _tiny(tmp_path, *extra):
    return [
        "fit", "--config", "configs/eagle3-tiny.yaml",
        f"--data.init_args.prepare.output_dir={tmp_path / 'feats'}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'run'}",
        *extra,
    ]


def test_fit_tiny_config_logs_checkpoints_and_plugs_a_user_callback(tmp_path):
    main(_tiny(
        tmp_path, "--trainer.max_steps=10", "--trainer.val_check_interval=5",
        "--trainer.callbacks+=callbacks.acceptance_plot.AcceptancePlot",
    ))
    run = tmp_path / "run"
    (metrics,) = run.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    als = [float(r["val/acceptance_length"]) for r in rows if r.get("val/acceptance_length")]
    assert len(als) == 2 and all(a >= 1.0 for a in als)
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "best.json").exists()
    assert list(run.glob("**/acceptance_by_position.png"))


def test_unknown_key_fails_before_any_work_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_tiny(tmp_path, "--model.init_args.ttt_lenght=3"))
    assert "ttt_lenght" in capsys.readouterr().err
    assert not (tmp_path / "feats").exists()


def test_prepare_reads_the_fit_config_and_rejects_unknown_keys(tmp_path, capsys):
    main(["prepare", "--config", "configs/eagle3-tiny.yaml", f"--output_dir={tmp_path / 'feats'}", "--num_samples=6",
          "--num_val_samples=2"])
    assert "prepared 6 train samples" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nnum_sample: 3\n")
    with pytest.raises(SystemExit, match="num_sample"):
        main(["prepare", "--config", str(bad)])


def test_unknown_command_is_named():
    with pytest.raises(SystemExit, match="unknown command 'fitt'"):
        main(["fitt"])


def _built_trainer(tmp_path, *extra):
    import lightning as L

    from specforge_lightning.cli import _cli_class

    args = ["--config", "configs/eagle3-tiny.yaml", f"--data.init_args.prepare.output_dir={tmp_path / 'feats'}",
            f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false", *extra]
    cli = _cli_class()(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                       subclass_mode_data=True, args=args, run=False, save_config_kwargs={"overwrite": True})
    return cli.trainer


def test_the_default_progress_bar_is_throttled_and_a_given_one_wins(tmp_path):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from specforge_lightning.cli import PROGRESS_REFRESH_PER_S

    bar = _built_trainer(tmp_path).progress_bar_callback
    assert isinstance(bar, RichProgressBar) and bar.refresh_rate == PROGRESS_REFRESH_PER_S == 2
    mine = _built_trainer(tmp_path, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
                          "--trainer.callbacks.refresh_rate=7").progress_bar_callback
    assert isinstance(mine, TQDMProgressBar) and mine.refresh_rate == 7
    assert _built_trainer(tmp_path, "--trainer.enable_progress_bar=false").progress_bar_callback is None
