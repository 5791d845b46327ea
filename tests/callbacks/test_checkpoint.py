"""SpecForgeCheckpoint: cadence, rotation, best on every validation, durable records, pointers, atomic writes."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from specforge_lightning.callbacks import (
    CheckpointError,
    ResumeState,
    SafeCheckpointIO,
    SpecForgeCheckpoint,
    find_best_checkpoint,
    find_last_checkpoint,
    read_checkpoint,
)

METRIC = "val/acceptance_length"


class ScoreModule(L.LightningModule):
    """A linear model whose validation reports a scripted score per global step."""

    def __init__(self, scores: dict[int, float] | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.scores = scores or {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log(METRIC, float(self.scores.get(self.global_step, 0.0)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 4), torch.zeros(4, 1)), batch_size=4)


def _trainer(root, callback: SpecForgeCheckpoint, **kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(root), max_steps=12, val_check_interval=4,
    )
    return L.Trainer(callbacks=[callback], **{**defaults, **kw})


def _steps(folder) -> list[int]:
    return sorted(int(p.name[5:13]) for p in folder.iterdir() if p.name.startswith("step-"))


def test_cadence_and_rotation_keep_the_newest_and_the_best(tmp_path):
    ckpt = SpecForgeCheckpoint(every_n_train_steps=2, keep_last=2, monitor=None)
    _trainer(tmp_path, ckpt, max_steps=9, limit_val_batches=0).fit(ScoreModule())
    folder = tmp_path / "checkpoints"
    assert _steps(folder) == [8, 9]  # step 9 is the final checkpoint (fit stopped at max_steps)
    assert find_last_checkpoint(folder) == str(folder / "step-00000009.ckpt")
    assert os.readlink(folder / "last.ckpt") == "step-00000009.ckpt"
    assert json.loads((folder / "last.json").read_text()) == {"step": 9, "path": "step-00000009.ckpt"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left


def test_best_is_tracked_on_every_validation_and_survives_a_restart(tmp_path):
    # 16 batches per epoch, validation every 4, cadence every 5: bests at 4 and 8 land off the cadence.
    scores = {4: 1.0, 8: 2.0, 12: 1.5, 16: 2.5}
    ckpt = SpecForgeCheckpoint(every_n_train_steps=5, keep_last=1)
    _trainer(tmp_path, ckpt, max_steps=16).fit(ScoreModule(scores))
    folder = tmp_path / "checkpoints"
    best = json.loads((folder / "best.json").read_text())
    assert best == {"metric": METRIC, "mode": "max", "score": 2.5, "step": 16, "path": "step-00000016.ckpt"}
    assert find_best_checkpoint(folder) == str(folder / "step-00000016.ckpt")
    assert ckpt.best_model_path == str(folder / "step-00000016.ckpt")
    assert ckpt._saved == {4: "step-00000004.ckpt", 5: "step-00000005.ckpt", 8: "step-00000008.ckpt",
                           10: "step-00000010.ckpt", 15: "step-00000015.ckpt", 16: "step-00000016.ckpt"}

    # A restart: worse scores never replace the best; rotation (keep 1) never deletes it.
    again = SpecForgeCheckpoint(every_n_train_steps=5, keep_last=1)
    _trainer(tmp_path, again, max_steps=24).fit(ScoreModule({20: 2.0, 24: 2.4}), ckpt_path="last")
    assert json.loads((folder / "best.json").read_text())["step"] == 16
    assert again.best_model_score.item() == 2.5
    assert _steps(folder) == [16, 24]  # the best, and the newest (final) one
    assert os.readlink(folder / "best.ckpt") == "step-00000016.ckpt"

    # A better score after the restart takes over, saved on demand (28 is off the cadence).
    third = SpecForgeCheckpoint(every_n_train_steps=5, keep_last=1)
    _trainer(tmp_path, third, max_steps=30).fit(ScoreModule({28: 3.0}), ckpt_path="last")
    record = json.loads((folder / "best.json").read_text())
    assert (record["step"], record["score"]) == (28, 3.0)
    assert _steps(folder) == [28, 30]


def test_ckpt_path_last_is_found_under_default_root_dir(tmp_path):
    _trainer(tmp_path, SpecForgeCheckpoint(every_n_train_steps=5, monitor=None), max_steps=7).fit(ScoreModule())
    trainer = _trainer(tmp_path, SpecForgeCheckpoint(every_n_train_steps=5, monitor=None), max_steps=10)
    trainer.fit(ScoreModule(), ckpt_path="last")
    assert trainer.ckpt_path == str(tmp_path / "checkpoints" / "step-00000007.ckpt")
    assert trainer.global_step == 10


def test_ckpt_path_last_without_any_checkpoint_starts_fresh(tmp_path):
    trainer = _trainer(tmp_path, SpecForgeCheckpoint(every_n_train_steps=5, monitor=None), max_steps=3)
    with pytest.warns(UserWarning, match="no last checkpoint"):
        trainer.fit(ScoreModule(), ckpt_path="last")
    assert trainer.global_step == 3


def test_json_pointer_when_symlinks_are_not_allowed(tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    _trainer(tmp_path, SpecForgeCheckpoint(every_n_train_steps=5), max_steps=6).fit(ScoreModule({4: 1.0}))
    folder = tmp_path / "checkpoints"
    assert not (folder / "last.ckpt").exists() and not (folder / "best.ckpt").exists()
    assert find_last_checkpoint(folder) == str(folder / "step-00000006.ckpt")
    assert find_best_checkpoint(folder) == str(folder / "step-00000004.ckpt")
    trainer = _trainer(tmp_path, SpecForgeCheckpoint(every_n_train_steps=5), max_steps=8)
    trainer.fit(ScoreModule(), ckpt_path="last")
    assert trainer.ckpt_path.endswith("step-00000006.ckpt")


def test_a_save_that_dies_half_way_leaves_the_previous_last_valid(tmp_path, monkeypatch):
    original = TorchCheckpointIO.save_checkpoint

    def torn(self, checkpoint, path, storage_options=None):
        original(self, checkpoint, path, storage_options)
        if checkpoint["global_step"] == 6:
            os.truncate(path, os.path.getsize(path) // 2)
            raise OSError("disk went away")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", torn)
    with pytest.raises(OSError, match="disk went away"):
        _trainer(tmp_path, SpecForgeCheckpoint(every_n_train_steps=3, monitor=None), max_steps=9).fit(ScoreModule())
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "last.json", "step-00000003.ckpt"]
    assert read_checkpoint(find_last_checkpoint(folder))["global_step"] == 3


def test_final_checkpoint_at_the_end_of_the_data(tmp_path):
    # 64 samples / 4 = 16 batches; one epoch, no max_steps: fit ends with the data.
    _trainer(tmp_path, SpecForgeCheckpoint(every_n_train_steps=5, monitor=None), max_steps=-1, max_epochs=1).fit(
        ScoreModule()
    )
    assert _steps(tmp_path / "checkpoints") == [10, 15, 16]  # keep_last=3
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["step"] == 16


def _bad_files(tmp_path, good: str) -> dict[str, str]:
    truncated = tmp_path / "truncated.ckpt"
    data = open(good, "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    return {"truncated": str(truncated), "garbage": str(garbage), "foreign": str(foreign),
            "missing": str(tmp_path / "nope.ckpt")}


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign", "missing"])
def test_bad_checkpoint_files_are_refused_naming_the_file_before_any_restore(tmp_path, kind):
    _trainer(tmp_path / "a", SpecForgeCheckpoint(every_n_train_steps=3, monitor=None), max_steps=3).fit(ScoreModule())
    path = _bad_files(tmp_path, find_last_checkpoint(tmp_path / "a" / "checkpoints"))[kind]
    module = ScoreModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path / "b", SpecForgeCheckpoint(every_n_train_steps=3, monitor=None), max_steps=6)
    with pytest.raises(CheckpointError, match=path.replace(".", r"\.")):
        trainer.fit(module, ckpt_path=path)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert trainer.global_step == 0


def test_safe_io_checks_run_before_lightning_restores_anything(tmp_path):
    io = SafeCheckpointIO()
    seen = []
    io.validators.append(lambda ckpt, path: seen.append((path, ckpt["global_step"])))
    _trainer(tmp_path, SpecForgeCheckpoint(every_n_train_steps=2, monitor=None), max_steps=2).fit(ScoreModule())
    path = find_last_checkpoint(tmp_path / "checkpoints")
    assert io.load_checkpoint(path)["global_step"] == 2 and seen == [(path, 2)]
    # ResumeState refuses a training checkpoint written without it, naming the file.
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, max_steps=4, default_root_dir=str(tmp_path / "b"),
        callbacks=[ResumeState(), SpecForgeCheckpoint(monitor=None)], num_sanity_val_steps=0,
    )
    with pytest.raises(CheckpointError, match=f"{path}.*not written with ResumeState"):
        trainer.fit(ScoreModule(), ckpt_path=path)


def test_ckpt_path_best_resolves_from_the_record_when_dirpath_is_given(tmp_path):
    folder = tmp_path / "ckpts"
    fit_ckpt = SpecForgeCheckpoint(dirpath=str(folder), every_n_train_steps=5)
    _trainer(tmp_path, fit_ckpt, max_steps=8).fit(ScoreModule({4: 2.0, 8: 1.0}))
    trainer = _trainer(tmp_path, SpecForgeCheckpoint(dirpath=str(folder)))
    trainer.validate(ScoreModule(), ckpt_path="best", verbose=False)
    assert trainer.ckpt_path == str(folder / "step-00000004.ckpt")


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_a_stop_request_refused_by_min_steps_saves_once_and_training_goes_on(tmp_path):
    ckpt = SpecForgeCheckpoint(every_n_train_steps=0, monitor=None)
    trainer = _trainer(tmp_path, ckpt, max_steps=8, min_steps=5, limit_val_batches=0)
    trainer.callbacks.insert(0, StopAt(2))
    trainer.fit(ScoreModule())
    assert trainer.global_step == 8 and _steps(tmp_path / "checkpoints") == [2, 8]
