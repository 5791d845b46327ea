"""GracefulPreemption: SIGTERM finishes the optimizer step, saves, leaves fit normally; the resume is exact."""

from __future__ import annotations

import json
import os
import signal

import lightning as L
import pytest
import torch

from specforge_lightning.callbacks import GracefulPreemption
from tests.integration.scripts.common import Interrupt, assert_same, fit


def _preemption(trainer: L.Trainer) -> GracefulPreemption:
    return next(cb for cb in trainer.callbacks if isinstance(cb, GracefulPreemption))


def test_sigterm_saves_at_the_step_and_exits_fit_cleanly_then_resumes_exactly(features, tmp_path):
    straight_rows, straight_weights, _ = fit(features, tmp_path / "straight", max_steps=8)
    handler_before = signal.getsignal(signal.SIGTERM)
    rows, _, trainer = fit(features, tmp_path, max_steps=8, interrupt=Interrupt(4, "SIGTERM"))
    assert trainer.global_step == 4 and _preemption(trainer).stopped_at_step == 4
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert trainer.state.status == "finished"  # fit returned; no exception, no interrupted state
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["step"] == 4
    assert signal.getsignal(signal.SIGTERM) == handler_before  # our handler is gone again
    resumed, final, _ = fit(features, tmp_path, max_steps=8, ckpt_path="last")
    assert_same(resumed, straight_rows, upto=4)
    assert all(torch.equal(final[k], straight_weights[k]) for k in final)


class SigtermAtMicroBatch(L.Callback):
    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_between_micro_batches_waits_for_the_optimizer_step(features, tmp_path):
    straight_rows, straight_weights, _ = fit(features, tmp_path / "straight", max_steps=6, accumulate=2)
    # Micro-batch 4 (0-based) is the first half of step 3: the stop comes after micro-batch 5.
    rows, _, trainer = fit(features, tmp_path, max_steps=6, accumulate=2, interrupt=SigtermAtMicroBatch(4))
    assert trainer.global_step == 3 and len(rows) == 6
    resumed, final, _ = fit(features, tmp_path, max_steps=6, accumulate=2, ckpt_path="last")
    assert_same(resumed, straight_rows, upto=3)
    assert all(torch.equal(final[k], straight_weights[k]) for k in final)


def test_unknown_signal_name_is_refused():
    with pytest.raises(ValueError, match="SIGNOPE"):
        GracefulPreemption(signals=["SIGNOPE"])
