"""Capture throughput: SGLangTargetEngine (a launched server, features through a shared-dir store) vs HFTargetEngine.

    python benchmarks/capture_sglang_vs_hf.py [--target tiny-llama] [--prompts 64] [--length 128] [--batch 8]

Same prompts, same layers, same machine; each engine gets one warm-up batch, then the timed
pass. Prints tokens/s of both and the ratio (SGLang / HF). Server start-up is not timed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from specforge_lightning.contracts import PromptTask
from specforge_lightning.target.engine import HFTargetEngine
from specforge_lightning.target.sglang_engine import SGLangTargetEngine
from specforge_lightning.target.zoo import resolve_target


def _tasks(n: int, length: int, vocab: int) -> list[PromptTask]:
    g = torch.Generator().manual_seed(0)
    return [
        PromptTask(f"b{i}", tuple(int(x) for x in torch.randint(3, vocab, (length,), generator=g)),
                   tuple(int(j >= length // 4) for j in range(length)))
        for i in range(n)
    ]


def _rate(engine, tasks, layers, batch) -> float:
    engine.capture(tasks[:batch], layers)  # warm-up
    t0 = time.perf_counter()
    for lo in range(0, len(tasks), batch):
        engine.capture(tasks[lo : lo + batch], layers)
    return sum(t.num_tokens for t in tasks) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="tiny-llama")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sglang_python", default=".venv-sglang/bin/python")
    args = p.parse_args()
    target = resolve_target(args.target)
    hf = HFTargetEngine.from_path(str(target), dtype=getattr(torch, args.dtype))
    if args.device != "cpu":
        hf.model.to(args.device)
        hf.device = torch.device(args.device)
    n = hf.num_layers
    layers = sorted({1, n // 2 - 1, n - 4})
    tasks = _tasks(args.prompts, args.length, int(hf.model.config.vocab_size))
    hf_rate = _rate(hf, tasks, layers, args.batch)
    del hf
    with SGLangTargetEngine.launch(target, layers, dtype=args.dtype, capture_dtype=args.dtype,
                                   python=args.sglang_python, device=args.device) as sg:
        sg_rate = _rate(sg, tasks, layers, args.batch)
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, device: {args.device}")
    print(f"target {args.target}: {args.prompts} prompts x {args.length} tokens, batch {args.batch}, {args.dtype}")
    print(f"HF capture:     {hf_rate:10.1f} tokens/s")
    print(f"SGLang capture: {sg_rate:10.1f} tokens/s")
    print(f"ratio SGLang/HF: {sg_rate / hf_rate:.2f}")


if __name__ == "__main__":
    main()
