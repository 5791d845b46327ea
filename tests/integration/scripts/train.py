"""One rank of a tiny EAGLE3 training run, for the multi-process resume tests.

Launched once per rank with torchrun-style variables (LOCAL_RANK, NODE_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so Lightning creates no processes and
the test sees every rank's exit code. Writes, under --out:
``rows_rank{r}.jsonl`` (what each micro-batch trained), ``result_rank{r}.json``
and ``weights_rank{r}[_step{k}].pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.*

import lightning as L  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402

from tests.integration.scripts.common import (  # noqa: E402
    Interrupt,
    SampleLog,
    build_data,
    build_module,
    build_trainer,
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--features", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--every_n", type=int, default=5)
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--interrupt_step", type=int, default=0)
    p.add_argument("--interrupt_action", default="SIGKILL")
    p.add_argument("--interrupt_ranks", default=None, help="comma-separated ranks; default all")
    p.add_argument("--kill_during_save_step", type=int, default=0)
    p.add_argument("--validate_first", action="store_true")
    p.add_argument("--dump_steps", default="", help="comma-separated steps at which to save weights")
    p.add_argument("--count_syncs", action="store_true")
    return p.parse_args()


class DumpWeights(L.Callback):
    def __init__(self, out: Path, steps: set[int]) -> None:
        self.out, self.steps = out, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            path = self.out / f"weights_rank{trainer.global_rank}_step{trainer.global_step}.pt"
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, path)


class CountSyncs(L.Callback):
    """Records, for every DDP gradient all-reduce, how many micro-batches the run had started."""

    def __init__(self) -> None:
        self.syncs: list[int] = []

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        progress = trainer.fit_loop.epoch_loop.batch_progress

        def hook(state, bucket):
            self.syncs.append(progress.total.ready)
            return allreduce_hook(None, bucket)

        trainer.strategy.model.register_comm_hook(None, hook)


def kill_during_save(step: int) -> None:
    """Make the write of the step-``step`` checkpoint die half-way: half the bytes on disk, then SIGKILL."""
    original = TorchCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None):
        original(self, checkpoint, path, storage_options)
        if checkpoint["global_step"] == step:
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    TorchCheckpointIO.save_checkpoint = save


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.kill_during_save_step:
        kill_during_save(args.kill_during_save_step)
    L.seed_everything(0, verbose=False)
    log = SampleLog(str(out / f"rows_rank{rank}.jsonl"))
    callbacks: list[L.Callback] = [log]
    if args.interrupt_step:
        ranks = tuple(int(r) for r in args.interrupt_ranks.split(",")) if args.interrupt_ranks else None
        callbacks.append(Interrupt(args.interrupt_step, args.interrupt_action, ranks))
    dump_steps = {int(s) for s in args.dump_steps.split(",") if s}
    if dump_steps:
        callbacks.append(DumpWeights(out, dump_steps))
    syncs = CountSyncs() if args.count_syncs else None
    if syncs:
        callbacks.append(syncs)
    trainer = build_trainer(
        args.root, devices=args.devices, max_steps=args.max_steps, accumulate=args.accumulate,
        every_n=args.every_n, callbacks=callbacks,
    )
    result: dict = {}
    if args.validate_first:
        # Its own module, built from the same seed: the fit below starts from identical weights and RNG.
        validator = build_trainer(args.root, devices=args.devices, checkpoint=False)
        metrics = validator.validate(build_module(), build_data(args.features, batch_size=args.batch_size), verbose=False)
        result["validate_first"] = {k: float(v) for k, v in metrics[0].items()}
        L.seed_everything(0, verbose=False)
    module = build_module()
    data = build_data(args.features, batch_size=args.batch_size)
    trainer.fit(module, data, ckpt_path=args.ckpt_path)
    preemption = next(cb for cb in trainer.callbacks if type(cb).__name__ == "GracefulPreemption")
    result.update(global_step=trainer.global_step, preempted_at=preemption.stopped_at_step, syncs=syncs.syncs if syncs else None)
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out / f"weights_rank{rank}.pt")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
