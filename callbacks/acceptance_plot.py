"""AcceptancePlot: a picture of per-position accuracy after every validation.

    --trainer.callbacks+=callbacks.acceptance_plot.AcceptancePlot

Reads the logged ``val/acc_k`` metrics, so it works for any algorithm that logs them.
"""

from __future__ import annotations

import os

import lightning as L


class AcceptancePlot(L.Callback):
    def __init__(self, every_n_validations: int = 1, filename: str = "acceptance_by_position.png") -> None:
        self.every_n_validations = every_n_validations
        self.filename = filename
        self.history: list[tuple[int, list[float], float]] = []
        self._validations = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        accs = [float(metrics[f"val/acc_{k}"]) for k in range(64) if f"val/acc_{k}" in metrics]
        if not accs:
            return
        al = float(metrics.get("val/acceptance_length", float("nan")))
        self.history.append((trainer.global_step, accs, al))
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._plot(os.path.join(trainer.log_dir or trainer.default_root_dir, self.filename))

    def _plot(self, path: str) -> None:
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
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
