"""Benchmark: SmolLM2 capture throughput, and loader throughput vs a raw safetensors load.

    python benchmarks/capture_and_loader.py [--num_samples 64] [--max_length 256] [--threads 2]

Prints capture tokens/s (bf16, HF backend, this machine), then reads the same
shard files twice: through PreparedShardStore + FeatureDataLoader (get, clone,
release, collate) and with a plain ``safetensors.torch.load_file`` per shard whose
tensors are cloned (load_file maps lazily; the clone makes it read the bytes).
The loader's goal is >= 0.8x the raw rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from specforge_lightning.data.loader import FeatureDataLoader
from specforge_lightning.data.stores.shards import read_shard_index
from specforge_lightning.data.stores.local import PreparedShardStore
from specforge_lightning.target.prepare import PrepareConfig, prepare


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output_dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-features-"))
    cfg = PrepareConfig(
        output_dir=str(out), target=args.target, num_samples=args.num_samples, num_val_samples=0,
        max_length=args.max_length, batch_size=args.batch_size, shard_size=32, layer_preset="eagle3",
    )
    t0 = time.perf_counter()
    manifest = prepare(cfg, progress=False)
    wall = time.perf_counter() - t0
    tokens = manifest["splits"]["train"]["num_tokens"]
    print(f"capture: {tokens} tokens, {manifest.get('capture_tokens_per_s', float('nan')):.0f} tokens/s in the forward "
          f"passes, {tokens / wall:.0f} tokens/s wall (incl. model load and writes)")

    shards = [out / rel for rel in manifest["splits"]["train"]["shards"]]
    nbytes = sum(s.stat().st_size for s in shards)
    refs = [r for s in shards for r in read_shard_index(s)]

    def raw() -> int:
        # load_file maps the file lazily; clone each tensor so the bytes are really read,
        # the same single copy into process memory that the loader's clone makes.
        n = 0
        for s in shards:
            tensors = {k: t.clone() for k, t in load_file(str(s)).items()}
            n += len({k.split("/")[0] for k in tensors})
        return n

    def ours() -> int:
        store = PreparedShardStore(out)
        loader = FeatureDataLoader(store, refs=refs, batch_size=1, shuffle=False, drop_last=False)
        return sum(len(b) for b in loader)

    rates = {}
    for name, fn in (("raw safetensors", raw), ("FeatureDataLoader", ours)):
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            n = fn()
            best = min(best, time.perf_counter() - t)
        rates[name] = (n / best, nbytes / best / 1e6)
        print(f"{name:>18}: {n / best:8.1f} samples/s  {nbytes / best / 1e6:8.1f} MB/s  ({n} samples, {nbytes / 1e6:.1f} MB)")
    ratio = rates["FeatureDataLoader"][0] / rates["raw safetensors"][0]
    print(f"loader / raw = {ratio:.2f}x (goal >= 0.80x)")


if __name__ == "__main__":
    main()
