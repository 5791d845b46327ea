"""The example user callbacks in callbacks/, plugged in from the command line on configs/eagle3-tiny.yaml.

Each is given as ``--trainer.callbacks+=callbacks.<module>.<Class>`` (the repository root is on
the path, as when running from it), under ``fit`` and, for those that only use hooks the
Fabric loop's TrainerView serves, under ``fabric``. Validation runs every 2 batches.
"""

from __future__ import annotations

import json

import pytest
import torch

from specforge_lightning.cli import main


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    out = tmp_path_factory.mktemp("example_callbacks") / "features"
    main(["prepare", "--config", "configs/eagle3-tiny.yaml", f"--output_dir={out}"])
    return out


def run(command: str, feats, root, *extra: str) -> None:
    main([command, "--config", "configs/eagle3-tiny.yaml", f"--data.init_args.prepare.output_dir={feats}",
          f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.val_check_interval=2",
          *(["--trainer.enable_progress_bar=false"] if command == "fit" else []), *extra])


@pytest.mark.parametrize("command", ["fit", "fabric"])
def test_plateau_stop_ends_the_run_early_and_says_why(feats, tmp_path, command):
    # min_delta=100: no validation after the first is a gain; validations 2 and 3 (steps 4, 6) use up patience.
    run(command, feats, tmp_path, "--trainer.max_steps=40", "--trainer.callbacks+=callbacks.plateau_stop.PlateauStop",
        "--trainer.callbacks.patience=2", "--trainer.callbacks.min_delta=100")
    record = json.loads((tmp_path / "plateau_stop.json").read_text())
    assert record["stopped_at_step"] == 6 and record["best_step"] == 2
    assert "val/acceptance_length did not improve by more than 100.0 for 2 validations" in record["reason"]
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["step"] == 6  # stopped, saved: not 40
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    assert {"best_step": 2, "wait": 2}.items() <= next(v for k, v in state.items() if "PlateauStop" in k).items()


def test_export_best_refreshes_an_hf_folder_matching_the_best_checkpoint(feats, tmp_path, capsys):
    from specforge_lightning.export.drafts import load_draft

    run("fit", feats, tmp_path, "--trainer.max_steps=6", "--trainer.callbacks+=callbacks.export_best.ExportBest")
    exports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("exported eagle3 checkpoint")]
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    folder = tmp_path / "best-hf"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not (tmp_path / "best-hf.tmp").exists() and not (tmp_path / "best-hf.old").exists()
    ckpt = tmp_path / "checkpoints" / best["path"]
    assert json.loads((folder / "exported.json").read_text())["checkpoint"] == str(ckpt.resolve())
    assert exports and str(ckpt) in exports[-1]  # one export per new best, the last of the best
    _, exported = load_draft(folder)
    _, trained = load_draft(ckpt)
    a, b = exported.draft.state_dict(), trained.draft.state_dict()
    assert exported.kind == "hf" and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_acceptance_plot_writes_pngs_every_n_validations_under_fabric(feats, tmp_path):
    run("fabric", feats, tmp_path, "--trainer.max_steps=8",
        "--trainer.callbacks+=callbacks.acceptance_plot.AcceptancePlot",
        "--trainer.callbacks.every_n_validations=2", "--trainer.callbacks.keep_each=true")
    assert (tmp_path / "acceptance_by_position.png").stat().st_size > 0
    # Validations at steps 2, 4, 6, 8: plotted at the 2nd and the 4th.
    assert sorted(p.name for p in (tmp_path / "acceptance").glob("*.png")) == ["step-00000004.png", "step-00000008.png"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    history = next(v for k, v in state.items() if "AcceptancePlot" in k)["history"]
    assert [h[0] for h in history] == [2, 4, 6]  # the step-8 file is written at the step, before its validation
