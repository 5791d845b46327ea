"""The Fabric loop against the Trainer: same samples, same losses, bit-identical weights, each other's checkpoints.

CPU fp32, one process, accumulation 2 (24 samples, batch 2: 6 optimizer steps per epoch).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.fabric.common import Sigterm, features, run_fabric, run_trainer, same_rows, same_weights, tail_after


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return features(tmp_path_factory.mktemp("fabric") / "features")


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash"])
def test_same_losses_and_bit_identical_weights(feats, tmp_path, algorithm):
    rows_t, weights_t, trainer = run_trainer(feats, tmp_path / "t", algorithm, max_steps=8)
    rows_f, weights_f, loop = run_fabric(feats, tmp_path / "f", algorithm, max_steps=8)
    assert len(rows_f) == 16 and same_rows(rows_f, rows_t)  # per micro-batch: step, ids, loss, RNG draws
    assert same_weights(weights_f, weights_t)
    # The metrics, reduced the same way (the epoch-end validation after step 6 included).
    assert {k: float(v) for k, v in loop.view.callback_metrics.items()} == {
        k: float(v) for k, v in trainer.callback_metrics.items()
    }


@pytest.mark.parametrize("stop", [5, 6])  # mid-epoch, end of epoch
def test_fabric_stopped_by_sigterm_resumes_under_trainer_and_back(feats, tmp_path, stop):
    straight, final, _ = run_trainer(feats, tmp_path / "straight", "eagle3", max_steps=12, every_n=3, checkpoint=True)

    # Fabric, SIGTERM on the first micro-batch of step `stop`: the step finishes, is saved, the loop returns.
    rows, _, loop = run_fabric(feats, tmp_path / "a", "eagle3", max_steps=12, every_n=3, checkpoint=True,
                               callbacks=[Sigterm(stop)])
    assert loop.view.global_step == stop and rows[-1]["step"] == stop
    assert json.loads((tmp_path / "a" / "checkpoints" / "last.json").read_text())["step"] == stop
    resumed, weights, _ = run_trainer(feats, tmp_path / "a", "eagle3", max_steps=12, every_n=3, checkpoint=True,
                                      ckpt_path="last")
    assert same_rows(resumed, tail_after(straight, stop)) and same_weights(weights, final)

    # The reverse: the Trainer stops, the Fabric loop resumes.
    run_trainer(feats, tmp_path / "b", "eagle3", max_steps=12, every_n=3, checkpoint=True, callbacks=[Sigterm(stop)])
    resumed, weights, _ = run_fabric(feats, tmp_path / "b", "eagle3", max_steps=12, every_n=3, checkpoint=True,
                                     ckpt_path="last")
    assert same_rows(resumed, tail_after(straight, stop)) and same_weights(weights, final)

    # Both loops wrote the same checkpoint at the stop: loop state, data position, optimizer, schedule.
    name = f"step-{stop:08d}.ckpt"
    fab = torch.load(tmp_path / "a" / "checkpoints" / name, weights_only=True)
    tra = torch.load(tmp_path / "b" / "checkpoints" / name, weights_only=True)
    assert sorted(fab) == sorted(tra)
    assert fab["loops"] == tra["loops"] and fab["epoch"] == tra["epoch"] and fab["global_step"] == tra["global_step"]
    assert fab["specforge_resume"]["ranks"]["0"]["loader"] == tra["specforge_resume"]["ranks"]["0"]["loader"]
    assert str(fab["optimizer_states"]) == str(tra["optimizer_states"]) and fab["lr_schedulers"] == tra["lr_schedulers"]
    assert same_weights(fab["state_dict"], tra["state_dict"])


def test_cli_fabric_trains_checkpoints_and_resumes_under_fit(tmp_path):
    from specforge_lightning.cli import main

    common = ["--config", "configs/eagle3-tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}",
              f"--data.init_args.prepare.output_dir={tmp_path / 'features'}", "--trainer.logger=false"]
    main(["fabric", *common, "--trainer.max_steps=12"])
    ckpts = tmp_path / "run" / "checkpoints"
    assert json.loads((ckpts / "last.json").read_text())["step"] == 12
    assert json.loads((ckpts / "best.json").read_text())["step"] == 10  # validation every 10 batches
    assert (tmp_path / "run" / "config.yaml").is_file()
    main(["fabric", *common, "--trainer.max_steps=14", "--ckpt_path=last"])
    assert json.loads((ckpts / "last.json").read_text())["step"] == 14
    main(["fit", *common, "--trainer.max_steps=16", "--ckpt_path=last", "--trainer.enable_progress_bar=false"])
    assert json.loads((ckpts / "last.json").read_text())["step"] == 16


def test_cli_fabric_refuses_a_trainer_setting_it_does_not_run(tmp_path, capsys):
    from specforge_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fabric", "--config", "configs/eagle3-tiny.yaml", "--trainer.max_time=00:01:00:00",
              f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "trainer.max_time" in capsys.readouterr().err
