"""One rank of a tiny 2-rank gloo run, by the Trainer or by the Fabric loop, for tests/fabric/test_ddp.py.

Launched once per rank with torchrun-style variables (LOCAL_RANK, NODE_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so neither Lightning nor Fabric starts processes and the test
sees each rank's exit code. Writes, under --out: ``rows_rank{r}.json`` (what each
micro-batch trained), ``metrics_rank{r}.json`` (callback_metrics) and ``weights_rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.*

import torch.distributed as dist  # noqa: E402

from tests.fabric.common import run_fabric, run_trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loop", choices=("trainer", "fabric"), required=True)
    p.add_argument("--algorithm", choices=("eagle3", "dflash"), required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--accumulate", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = run_trainer if args.loop == "trainer" else run_fabric
    rows, weights, owner = run(Path(args.features), Path(args.root), args.algorithm, max_steps=args.max_steps,
                               accumulate=args.accumulate, devices=int(os.environ["WORLD_SIZE"]))
    view = owner.view if args.loop == "fabric" else owner
    rank = view.global_rank
    metrics = {k: float(v) for k, v in view.callback_metrics.items()}
    (out / f"rows_rank{rank}.json").write_text(json.dumps(rows))
    (out / f"metrics_rank{rank}.json").write_text(json.dumps(metrics))
    torch.save(weights, out / f"weights_rank{rank}.pt")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
