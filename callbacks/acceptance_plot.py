"""AcceptancePlot: a picture of per-position accuracy and acceptance length, every N validations.

    --trainer.callbacks+=callbacks.acceptance_plot.AcceptancePlot \
    --trainer.callbacks.every_n_validations=2 --trainer.callbacks.keep_each=true

Reads the logged ``val/acc_k`` and ``val/acceptance_length`` metrics, so it works for any
algorithm that logs them. Rank 0 writes ``<log_dir>/acceptance_by_position.png`` (the last
five curves, and acceptance length over the whole run); with ``keep_each`` also a copy per
plot, ``<log_dir>/acceptance/step-XXXXXXXX.png``. The history is saved in the checkpoint,
so a resumed run's plot goes on from where it stopped.
Hooks used: ``on_validation_end`` only, so it also runs under the ``fabric`` command.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L


class AcceptancePlot(L.Callback):
    def __init__(self, every_n_validations: int = 1, filename: str = "acceptance_by_position.png",
                 keep_each: bool = False) -> None:
        if every_n_validations < 1:
            raise ValueError(f"AcceptancePlot: every_n_validations must be >= 1, got {every_n_validations}")
        self.every_n_validations = every_n_validations
        self.filename = filename
        self.keep_each = keep_each
        self.history: list[tuple[int, list[float], float]] = []
        self.written: list[str] = []  # the files this run wrote, newest last

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        accs = [float(metrics[f"val/acc_{k}"]) for k in range(64) if f"val/acc_{k}" in metrics]
        if not accs:
            return
        al = float(metrics.get("val/acceptance_length", float("nan")))
        self.history.append((trainer.global_step, accs, al))
        if len(self.history) % self.every_n_validations:
            return
        folder = trainer.log_dir or trainer.default_root_dir
        paths = [os.path.join(folder, self.filename)]
        if self.keep_each:
            paths.append(os.path.join(folder, "acceptance", f"step-{trainer.global_step:08d}.png"))
        self._plot(paths)
        self.written += paths

    def _plot(self, paths: list[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for step, accs, _ in self.history[-5:]:
            left.plot(range(len(accs)), accs, marker="o", label=f"step {step}")
        left.set(xlabel="draft position k", ylabel="val/acc_k", ylim=(0, 1), title="per-position accuracy")
        left.legend()
        right.plot([h[0] for h in self.history], [h[2] for h in self.history], marker="o")
        right.set(xlabel="optimizer step", ylabel="simulated AL (bonus token counted)", title="val/acceptance_length")
        fig.tight_layout()
        for path in paths:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fig.savefig(path, dpi=100)
        plt.close(fig)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[step, accs, al] for step, accs, al in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), list(accs), float(al)) for step, accs, al in state_dict.get("history", [])]
