"""Benchmark: one DFlash training step at the SmolLM2-135M shapes, on random tensors.

    python benchmarks/dflash_step.py [--anchors 64 512] [--seq_len 320] [--steps 10] [--device cuda]
    python benchmarks/dflash_step.py --tiny      # seconds: checks the script runs

No target is loaded and no features are read: the draft is built from a
SmolLM2-shaped config dict (hidden 576, 30 layers → spread:5 = 5 captured
layers, vocab 49152, block 16) with random frozen embedding/head, and every
batch is random ids plus random aux states. A step is ``DFlashModule.compute_loss``
(anchor draw, block forward, chunked full-vocab CE) under bf16 autocast, backward,
clipping at 1.0 and AdamW, exactly as the Trainer runs it minus the loop.

Anchors are drawn among valid positions, so a sample of S tokens has at most
S-1 of them: ``--seq_len 320`` (the recipe's max_length) caps 512 anchors at 319;
the line printed shows the anchors actually drawn. Each anchor count runs in
its own spawned process, so the peak memory (CUDA: max allocated; CPU: max RSS)
is that configuration's alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from typing import Any

import torch

SMOLLM2 = {  # HuggingFaceTB/SmolLM2-135M-Instruct config.json, the fields the draft reads
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152, "hidden_act": "silu",
}
TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 512, "vocab_size": 512, "hidden_act": "silu",
}


def build(cfg: dict[str, Any], args: argparse.Namespace, num_anchors: int, device: torch.device):
    """A DFlashModule whose draft has random trainable weights and a random frozen embedding and head."""
    from specforge_lightning.algorithms.dflash import DFlashConfig, DFlashDraft, DFlashModule
    from specforge_lightning.target.layers import resolve_layer_ids

    layer_ids = resolve_layer_ids("spread:5", int(cfg["num_hidden_layers"]))
    module = DFlashModule(block_size=args.block_size, num_anchors=num_anchors, objective_chunk_rows=args.chunk_rows)
    config = DFlashConfig.from_target_config(cfg, layer_ids, mask_token_id=0, block_size=args.block_size)
    draft = DFlashDraft(config)
    g = torch.Generator().manual_seed(0)
    V, H = config.vocab_size, config.hidden_size
    frozen = getattr(torch, args.frozen_dtype)
    emb = (torch.randn(V, H, generator=g) * 0.02).to(frozen)
    head = (torch.randn(V, H, generator=g) * 0.02).to(frozen)
    draft.set_target_weights(emb, head)
    module.draft, module.draft_config = draft.to(device), config
    return module, layer_ids


def random_batch(cfg: dict[str, Any], n_layers: int, args: argparse.Namespace, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, S, H = args.batch_size, args.seq_len, int(cfg["hidden_size"])
    loss_mask = torch.ones(B, S, dtype=torch.long)
    loss_mask[:, : S // 8] = 0  # a prompt part, as in chat data
    return {
        "input_ids": torch.randint(0, int(cfg["vocab_size"]), (B, S), generator=g).to(device),
        "loss_mask": loss_mask.to(device),
        "aux_hidden_states": torch.randn(B, S, n_layers * H, generator=g).to(getattr(torch, args.aux_dtype)).to(device),
    }


def run_one(cfg: dict[str, Any], args: argparse.Namespace, num_anchors: int) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    module, layer_ids = build(cfg, args, num_anchors, device)
    params = [p for p in module.draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=6e-4, fused=True)  # as build_adamw_cosine on CPU
    batches = [random_batch(cfg, len(layer_ids), args, device, seed=i) for i in range(2)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, drawn = [], 0
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32):
            out = module.compute_loss(batch, step=step)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
        drawn = int(out.counts.blocks)
    times.sort()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "anchors": num_anchors, "drawn": drawn, "median_s": times[len(times) // 2], "min_s": times[0],
        "peak_mb": peak, "loss": float(out.loss.detach()), "layer_ids": layer_ids,
        "trainable": sum(p.numel() for p in params),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anchors", type=int, nargs="+", default=None, help="anchor counts (default 64 512; tiny 8 16)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sample (default 320; tiny 48)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--block_size", type=int, default=None, help="default 16; tiny 4")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk_rows", type=int, default=2048, help="objective_chunk_rows (scored rows per CE chunk)")
    p.add_argument("--frozen_dtype", default="bfloat16", help="embedding/head storage dtype")
    p.add_argument("--aux_dtype", default="bfloat16", help="captured aux states dtype")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: check that the script works")
    args = p.parse_args()
    cfg = TINY if args.tiny else SMOLLM2
    args.anchors = args.anchors or ([8, 16] if args.tiny else [64, 512])
    args.seq_len = args.seq_len or (48 if args.tiny else 320)
    args.block_size = args.block_size or (4 if args.tiny else 16)
    args.steps = args.steps or (2 if args.tiny else 10)
    if args.tiny:
        args.warmup = min(args.warmup, 1)

    print(f"shapes: {'tiny' if args.tiny else 'SmolLM2-135M'} hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}, "
          f"{cfg['num_hidden_layers']} target layers (spread:5), block {args.block_size}, batch {args.batch_size} x "
          f"{args.seq_len} tokens, device {args.device}, threads {args.threads}, "
          f"{'fp32' if args.fp32 else 'bf16 autocast'}, CE chunk {args.chunk_rows} rows")
    spawn = mp.get_context("spawn")
    for n in args.anchors:
        with spawn.Pool(1) as pool:  # a fresh process per configuration: its own peak memory
            r = pool.apply(run_one, (cfg, args, n))
        scored = r["drawn"] * (args.block_size - 1)
        print(f"anchors {n:4d} ({r['drawn']:4d} blocks in the batch, <= {scored} scored rows): "
              f"{r['median_s'] * 1000:8.1f} ms/step median ({r['min_s'] * 1000:.1f} min), "
              f"peak {'GPU allocated' if args.device.startswith('cuda') else 'RSS'} {r['peak_mb']:.0f} MB, "
              f"loss {r['loss']:.3f}, layers {r['layer_ids']}, trainable {r['trainable'] / 1e6:.2f}M")


if __name__ == "__main__":
    main()
