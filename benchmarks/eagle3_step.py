"""Benchmark: one EAGLE3 training step at the default config's shapes, Lightning vs a bare loop.

    python benchmarks/eagle3_step.py [--features outputs/features/eagle3-smollm2] [--steps 30]

Both paths call the same ``Eagle3Module.compute_loss`` on the same batches with
bf16 autocast, AdamW and clipping at 0.5. The Trainer runs without logger,
checkpointing or progress bar, so the ratio measures Lightning's own overhead
(goal <= 1.05). Peak memory is the process's max RSS after each phase.
"""

from __future__ import annotations

import argparse
import resource
import time

import lightning as L
import torch

from specforge_lightning.algorithms.eagle3 import Eagle3Module
from specforge_lightning.data.manifest import read_manifest
from specforge_lightning.datamodules import FeatureDataModule
from specforge_lightning.target.prepare import PrepareConfig

PREPARE_FIELDS = set(PrepareConfig.__dataclass_fields__) - {"output_dir"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--features", default="outputs/features/eagle3-smollm2")
    p.add_argument("--num_samples", type=int, default=200, help="when the features must be captured first")
    p.add_argument("--num_val_samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--ttt_length", type=int, default=2, help="configs/eagle3.yaml uses 2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    manifest = read_manifest(args.features)
    if manifest is None:  # capture a default set first
        prep = PrepareConfig(output_dir=args.features, num_samples=args.num_samples, num_val_samples=args.num_val_samples,
                             layer_preset="eagle3")
    else:  # reuse prepared features as they are (e.g. the quickstart's)
        prep = PrepareConfig(output_dir=args.features, **{k: v for k, v in manifest.items() if k in PREPARE_FIELDS})
    dm = FeatureDataModule(prep, batch_size=args.batch_size, prefetch=2)
    dm.prepare_data()
    dm.setup("fit")

    # Bare PyTorch loop over the module's own step.
    torch.manual_seed(0)
    module = Eagle3Module(ttt_length=args.ttt_length)
    module.build(dm.feature_context)
    opt = torch.optim.AdamW(module.draft.parameters(), lr=5e-4, fused=True)  # as build_adamw_cosine on CPU
    loader = dm.make_loader("train", batch_size=args.batch_size, shuffle=True, drop_last=True)
    times, step = [], 0
    while step < args.steps:
        for batch in loader:
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = module.compute_loss(batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.draft.parameters(), 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            step += 1
            if step == args.steps:
                break
    bare = median(times[3:])
    bare_rss = peak_rss_mb()

    # The same step under the Lightning Trainer.
    torch.manual_seed(0)
    module = Eagle3Module(ttt_length=args.ttt_length)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=args.steps, gradient_clip_val=0.5,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    lit = median(timer.times[3:])
    tokens = args.batch_size * prep.max_length
    print(f"shapes: batch {args.batch_size} x <= {prep.max_length} tokens, ttt {args.ttt_length}, "
          f"draft vocab {prep.draft_vocab_size}, threads {args.threads}")
    print(f"bare PyTorch loop : {bare * 1000:7.1f} ms/step  (~{tokens / bare:.0f} tokens/s at full length)")
    print(f"Lightning Trainer : {lit * 1000:7.1f} ms/step")
    print(f"Lightning / bare  : {lit / bare:.3f} (goal <= 1.05)")
    print(f"peak RSS: {bare_rss:.0f} MB after the bare loop, {peak_rss_mb():.0f} MB after both")


if __name__ == "__main__":
    main()
