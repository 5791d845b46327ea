"""Exact resume on one rank, in-process: same samples, losses, RNG draws and weights as an uninterrupted run.

24 train samples in batches of 2: an epoch is 12 optimizer steps, validated at its end.
"""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch

from specforge_lightning.callbacks import (
    CheckpointError,
    ResumeMismatchError,
    ResumeState,
    SpecForgeCheckpoint,
    find_best_checkpoint,
)
from tests.integration.scripts.common import (
    Interrupt,
    assert_same,
    build_data,
    build_module,
    fit,
    key,
    weights,
)


@pytest.fixture(scope="module")
def straight(features, tmp_path_factory):
    """16 uninterrupted steps (one epoch and 4 steps of the next)."""
    return fit(features, tmp_path_factory.mktemp("straight"))


def test_crash_then_resume_from_last_is_exact(features, tmp_path, straight):
    rows, _, _ = fit(features, tmp_path, interrupt=Interrupt(7))
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["step"] == 5
    resumed, final, trainer = fit(features, tmp_path, ckpt_path="last")
    assert trainer.ckpt_path.endswith("step-00000005.ckpt")
    assert_same(resumed, straight[0], upto=5)  # crosses the epoch boundary at step 12
    assert all(torch.equal(final[k], straight[1][k]) for k in final)


def test_resume_from_a_best_checkpoint_saved_at_validation_is_exact(features, tmp_path, straight):
    fit(features, tmp_path, max_steps=16)
    best = find_best_checkpoint(tmp_path / "checkpoints")
    assert best.endswith("step-00000012.ckpt")  # the epoch-end validation, off the cadence (5, 10, 15)
    resumed, final, _ = fit(features, tmp_path / "again", ckpt_path=best)
    assert_same(resumed, straight[0], upto=12)
    assert all(torch.equal(final[k], straight[1][k]) for k in final)


@pytest.mark.parametrize("stop", [8, 12], ids=["mid-epoch", "epoch-end"])
def test_resume_from_a_max_steps_checkpoint_takes_no_extra_and_skips_no_batch(features, tmp_path, straight, stop):
    first, _, _ = fit(features, tmp_path, max_steps=stop)
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["step"] == stop
    second, _, trainer = fit(features, tmp_path, max_steps=16, ckpt_path="last")
    assert trainer.global_step == 16
    # Sample order, positions and Lightning's epoch counter continue as if never stopped
    # (losses differ: the LR schedule is sized by max_steps).
    assert key(first + second) == key(straight[0])


def test_end_of_data_checkpoint_resumes_into_the_next_epoch(features, tmp_path):
    two_epochs, _, _ = fit(features, tmp_path / "straight", max_steps=-1, max_epochs=2)
    first, _, _ = fit(features, tmp_path, max_steps=-1, max_epochs=1)
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["step"] == 12
    second, _, trainer = fit(features, tmp_path, max_steps=-1, max_epochs=2, ckpt_path="last")
    assert trainer.global_step == 24 and second[0]["epoch"] == 1 and second[0]["batch_index"] == 0
    assert key(first + second) == key(two_epochs)


def test_accumulated_run_resumes_exactly(features, tmp_path):
    straight_rows, straight_weights, _ = fit(features, tmp_path / "straight", max_steps=8, accumulate=2, every_n=3)
    fit(features, tmp_path, max_steps=8, accumulate=2, every_n=3, interrupt=Interrupt(5))
    resumed, final, _ = fit(features, tmp_path, max_steps=8, accumulate=2, every_n=3, ckpt_path="last")
    assert len(resumed) == 2 * (8 - 3)  # micro-batches of steps 4..8
    assert_same(resumed, straight_rows, upto=3)
    assert all(torch.equal(final[k], straight_weights[k]) for k in final)


@pytest.fixture(scope="module")
def saved(features, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    fit(features, root, max_steps=5)
    return root / "checkpoints" / "step-00000005.ckpt"


def _edited(saved, tmp_path, field, value):
    """The saved checkpoint as another run would have written it (a real 2-rank case is in the DDP tests)."""
    checkpoint = torch.load(saved, weights_only=True)
    checkpoint["specforge_resume"]["identity"][field] = value
    path = tmp_path / f"edited-{field}.ckpt"
    torch.save(checkpoint, path)
    return path


def _other_manifest(features, tmp_path):
    other = tmp_path / "other-features"
    shutil.copytree(features, other)
    manifest = json.loads((other / "manifest.json").read_text())
    # A field only the manifest's identity hash covers (the datamodule itself refuses a changed target).
    manifest["shard_size"] = int(manifest["shard_size"]) + 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


CHANGES = {
    "ttt_length": dict(module_kwargs={"ttt_length": 2}),
    "loss_decay": dict(module_kwargs={"loss_decay": 0.5}),
    "batch_size": dict(batch_size=3),
    "accumulate_grad_batches": dict(accumulate=2),
    "data_seed": dict(data_kwargs={"seed": 1}),
    "feature manifest": "manifest",
    "world_size": ("edit", 2),
    "algorithm": ("edit", "specforge_lightning.algorithms.dflash.module.DFlashModule"),
}


@pytest.mark.parametrize("field", list(CHANGES))
def test_resume_is_refused_naming_what_changed_before_anything_is_restored(features, tmp_path, saved, field):
    change = CHANGES[field]
    path, kwargs, feats = saved, {}, features
    if isinstance(change, tuple):
        path = _edited(saved, tmp_path, field, change[1])
    elif change == "manifest":
        feats = _other_manifest(features, tmp_path)
    else:
        kwargs = dict(change)
    data = build_data(feats, batch_size=kwargs.pop("batch_size", 2), **kwargs.pop("data_kwargs", {}))
    data.setup("fit")
    L.seed_everything(0, verbose=False)
    module = build_module(**kwargs.pop("module_kwargs", {}))
    module.build(data.feature_context)
    before = weights(module)
    with pytest.raises(ResumeMismatchError, match=rf"cannot resume from {path}: .*{field}") as info:
        fit(feats, tmp_path, ckpt_path=str(path), module=module, data=data, **kwargs)
    assert "warm_start_from" in str(info.value)
    after = weights(module)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was restored


def test_changed_learning_rate_is_honoured_not_refused(features, tmp_path, saved):
    rows, _, trainer = fit(features, tmp_path, max_steps=7, ckpt_path=str(saved), module_kwargs={"lr": 1e-3})
    assert [r["step"] for r in rows] == [6, 7]
    assert trainer.lightning_module.hparams.lr == 1e-3


def test_warm_start_takes_weights_only(features, tmp_path, saved):
    trained = torch.load(saved, weights_only=True)["state_dict"]

    class FirstWeights(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.weights = weights(pl_module)

    seen = FirstWeights()
    # batch size 3 would be refused for a resume; a warm start is a new run.
    resume = ResumeState(warm_start_from=str(saved))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path), callbacks=[seen, resume, SpecForgeCheckpoint(every_n_train_steps=0)],
    )
    trainer.fit(build_module(), build_data(features, batch_size=3))
    assert all(torch.equal(seen.weights[k], trained[k]) for k in trained)
    assert trainer.global_step == 2  # its own step count, optimizer and data position


def test_warm_start_from_a_bad_file_names_it(features, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=str(bad)):
        fit(features, tmp_path, max_steps=1, resume=ResumeState(warm_start_from=str(bad)))


def test_checkpoint_holds_every_rank_and_loads_with_weights_only(saved):
    checkpoint = torch.load(saved, weights_only=True)  # no pickled objects beyond plain types
    state = checkpoint["specforge_resume"]
    assert state["world_size"] == 1 and set(state["ranks"]) == {"0"}
    assert state["ranks"]["0"]["loader"] == {"epoch": 0, "batches_done": 5, "seed": 0}
    assert set(state["ranks"]["0"]["rng"]) >= {"torch", "python", "numpy"}
    assert "combined_loader" not in checkpoint["loops"]["fit_loop"]["state_dict"]  # Lightning's rank-0 copy
