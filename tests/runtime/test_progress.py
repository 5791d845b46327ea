"""Plain progress lines when output is not a terminal; rich bars (no plain lines) on a TTY."""

import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from specforge_lightning.runtime.progress import format_duration, format_rate, progress_line, track

ROOT = Path(__file__).resolve().parents[2]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_script(code: str, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter with stdout to a pipe (not a TTY); return its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_line_format():
    assert progress_line("capture", 3, 10, 6.0) == "capture: 3/10 (30%), rate 0.50/s, ETA 00:14"
    assert progress_line("capture", 10, 10, 125.0, final=True) == "capture: 10/10 (100%), rate 0.08/s, done in 02:05"
    assert progress_line("capture", 0, 10, 0.0) == "capture: 0/10 (0%), rate 0.00/s, ETA --:--"
    assert progress_line("stream", 7, None, 2.0) == "stream: 7, rate 3.50/s, ETA --:--"
    assert format_duration(3725) == "62:05" and format_duration(None) == "--:--"
    assert (format_rate(1234.5), format_rate(42.13), format_rate(0.1234)) == ("1234", "42.1", "0.12")


def test_subprocess_with_piped_stdout_prints_plain_lines():
    out = run_script("""
        import time
        from specforge_lightning.runtime.progress import track
        with track(4, "capture train", interval_s=0.1) as t:
            for _ in range(4):
                time.sleep(0.3)
                t.advance(1)
    """)
    lines = out.splitlines()
    assert lines[0] == "capture train: 0/4 (0%), rate 0.00/s, ETA --:--"
    middle = [l for l in lines[1:-1] if l.startswith("capture train: 2/4 (50%), rate ")]
    assert middle and all(" ETA 00:0" in l for l in middle)
    assert lines[-1].startswith("capture train: 4/4 (100%), rate ") and " done in 00:0" in lines[-1]
    assert "\r" not in out and "\x1b" not in out  # no bar redraws, no ANSI codes in a log


def test_heartbeat_prints_while_a_slow_item_runs():
    out = io.StringIO()
    with track(2, "regenerate", stream=out, interval_s=0.05) as t:
        t.advance(1)
        time.sleep(0.4)  # one slow batch: lines must keep coming
    lines = out.getvalue().splitlines()
    beats = [l for l in lines if l.startswith("regenerate: 1/2 (50%)")]
    assert len(beats) >= 2, lines
    assert lines[-1].startswith("regenerate: 1/2 (50%)") and "done in" in lines[-1]


def test_interval_is_respected():
    out = io.StringIO()
    with track(1000, "capture", stream=out, interval_s=60.0) as t:
        for _ in range(1000):
            t.advance(1)
    assert len(out.getvalue().splitlines()) == 2  # the start line and the final line only


def test_failure_prints_where_it_stopped_without_claiming_done():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with track(5, "capture", stream=out, interval_s=60.0) as t:
            t.advance(2)
            raise RuntimeError("boom")
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("capture: 2/5 (40%)") and "done in" not in last


def test_tty_shows_a_bar_not_plain_lines_and_disabled_is_silent():
    tty = FakeTTY()
    with track(3, "capture", stream=tty, interval_s=0.0) as t:
        for _ in range(3):
            t.advance(1)
    assert "rate " not in tty.getvalue() and "ETA" not in tty.getvalue()
    quiet = io.StringIO()
    with track(3, "capture", stream=quiet, interval_s=0.0, enabled=False) as t:
        t.advance(3)
    assert quiet.getvalue() == ""
    forced = FakeTTY()
    with track(1, "capture", stream=forced, plain=True) as t:
        t.advance(1)
    assert "capture: 1/1 (100%)" in forced.getvalue()


def test_fit_logger_in_a_subprocess_prints_steps_rate_eta_and_loss():
    out = run_script("""
        import time, torch, lightning as L
        from specforge_lightning.runtime.fit_progress import PlainProgressLogger

        class Tiny(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)
            def training_step(self, batch, idx):
                time.sleep(0.1)
                loss = self.layer(batch).pow(2).mean()
                self.log("train/loss", loss)
                return loss
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
            def train_dataloader(self):
                return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)

        torch.manual_seed(0)
        trainer = L.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[PlainProgressLogger(interval_s=0.1)])
        trainer.fit(Tiny())
    """)
    lines = [l for l in out.splitlines() if l.startswith("fit: ")]
    assert lines[0].startswith("fit: step 0/8 (0%), ") and "ETA --:--" in lines[0]
    middle = [l for l in lines[1:-1] if " steps/s, ETA 00:0" in l and "train/loss " in l]
    assert middle, lines
    assert lines[-1].startswith("fit: step 8/8 (100%), ") and "done in 00:0" in lines[-1] and "train/loss " in lines[-1]


def _fake_trainer(**kw):
    base = dict(is_global_zero=True, global_step=0, max_steps=-1, estimated_stepping_batches=float("inf"),
                callbacks=[], callback_metrics={})
    base.update(kw)
    return SimpleNamespace(**base)


def test_fit_logger_is_silent_on_a_tty_and_on_other_ranks():
    from specforge_lightning.runtime.fit_progress import PlainProgressLogger

    for stream, rank0 in ((FakeTTY(), True), (io.StringIO(), False)):
        cb = PlainProgressLogger(interval_s=0.0, stream=stream)
        trainer = _fake_trainer(is_global_zero=rank0)
        cb.on_train_start(trainer, None)
        cb.on_train_batch_end(trainer, None, None, None, 0)
        cb.on_train_end(trainer, None)
        assert stream.getvalue() == ""


def test_fit_logger_eta_follows_max_time():
    from lightning.pytorch.callbacks import Timer

    from specforge_lightning.runtime.fit_progress import PlainProgressLogger

    out = io.StringIO()
    cb = PlainProgressLogger(interval_s=60.0, stream=out)
    trainer = _fake_trainer(callbacks=[Timer(duration="00:00:10:00")])
    cb.on_train_start(trainer, None)
    try:
        assert out.getvalue().startswith("fit: step 0, 0.00 steps/s, ETA 10:00")
    finally:
        cb.on_train_end(trainer, None)
