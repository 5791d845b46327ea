"""Benchmark: the online data plane with real SmolLM2 features.

    python benchmarks/stream_throughput.py [--num_samples 32] [--max_length 128] [--steps 6]

Prints:
1. capture rate of the HF target (bf16, this machine): the producer's ceiling;
2. end-to-end samples/s of the data plane (put -> publish -> lease -> get -> clone ->
   collate -> durable ack -> free) through the local, shared-dir and Mooncake stores,
   on the captured SmolLM2 features;
3. Mooncake put/get GB/s through MooncakeFeatureStore vs the raw
   MooncakeDistributedStore bytes API (``put(key, bytes)`` / ``get(key)``) on the same
   tensors (goal: ours >= 0.8x raw);
4. the trainer's data-wait fraction (StreamHealth) for a short EAGLE3 fit, colocated
   (capture on a background thread, competing for the same cores) and disaggregated
   (the producer ran ahead to completion).

Mooncake parts start a private ``mooncake_master`` on 127.0.0.1 (``--no-mooncake`` skips them).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")

import torch  # noqa: E402

from specforge_lightning.control.ledger import InMemoryLedger  # noqa: E402
from specforge_lightning.control.sqlite_ledger import SqliteLedger  # noqa: E402
from specforge_lightning.data.loader import FeatureDataLoader  # noqa: E402
from specforge_lightning.data.ledger_stream import RankedLedgerStream  # noqa: E402
from specforge_lightning.data.stores.spec import StoreSpec, build_store  # noqa: E402
from specforge_lightning.target.capture import capture_in_order  # noqa: E402
from specforge_lightning.data.stores.local import LocalFeatureStore, nbytes_of  # noqa: E402
from specforge_lightning.target.prepare import PrepareConfig  # noqa: E402
from specforge_lightning.target.producer import plan_stream  # noqa: E402


def prepare_cfg(args: argparse.Namespace, out: Path) -> PrepareConfig:
    return PrepareConfig(
        output_dir=str(out), target=args.target, num_samples=args.num_samples, num_val_samples=0,
        max_length=args.max_length, batch_size=args.capture_batch, shard_size=args.shard_size,
        draft_vocab_size=args.draft_vocab, layer_preset="eagle3",
    )


# --------------------------------------------------------------------------- mooncake master


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mooncake_master():
    spec = importlib.util.find_spec("mooncake")
    binary = Path(next(iter(spec.submodule_search_locations))) / "mooncake_master"
    rpc, http, metrics = _port(), _port(), _port()
    cmd = [str(binary), "--rpc_address=127.0.0.1", f"--rpc_port={rpc}", "--enable_http_metadata_server=true",
           "--http_metadata_server_host=127.0.0.1", f"--http_metadata_server_port={http}",
           "--metrics_host=127.0.0.1", f"--metrics_port={metrics}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", rpc), timeout=0.2).close()
                socket.create_connection(("127.0.0.1", http), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)
        yield f"127.0.0.1:{rpc}", f"http://127.0.0.1:{http}/metadata"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


# --------------------------------------------------------------------------- data plane


def data_plane(samples, make_store, make_ledger, batch_size: int) -> tuple[float, float]:
    """Producer thread puts + publishes; this thread leases, loads, collates, commits. Returns (samples/s, MB/s)."""
    producer_store, consumer_store = make_store()
    ledger_p, ledger_c = make_ledger()
    stream = RankedLedgerStream(ledger_c, "bench", store=consumer_store, free_on_ack=True, poll_s=0.005)
    loader = FeatureDataLoader(consumer_store, stream=stream, batch_size=batch_size, prefetch=2, ack_mode="manual",
                               poll_timeout_s=0.05)

    def produce() -> None:
        for sid, feats in samples:
            ledger_p.publish([producer_store.put(feats, sid)])
        ledger_p.mark_done()

    t0 = time.perf_counter()
    thread = threading.Thread(target=produce)
    thread.start()
    n = 0
    for batch in loader:
        n += len(batch)
        loader.ack_pending()
        stream.commit(batch.sample_ids)
    thread.join()
    wall = time.perf_counter() - t0
    stream.close()
    nbytes = sum(nbytes_of(f) for _, f in samples[:n])
    for s in {id(producer_store): producer_store, id(consumer_store): consumer_store}.values():
        s.close()
    for led in {id(ledger_p): ledger_p, id(ledger_c): ledger_c}.values():
        led.close()
    return n / wall, nbytes / wall / 1e6


def mooncake_vs_raw(samples, master: str, metadata: str, repeats: int) -> dict[str, float]:
    from specforge_lightning.data.stores.mooncake import MooncakeFeatureStore
    from specforge_lightning.data.stores.mooncake_io import tensor_bytes

    store = MooncakeFeatureStore(master, metadata, prefix=f"bench{uuid.uuid4().hex[:6]}", segment_bytes=512 << 20,
                                 local_buffer_bytes=256 << 20, staging_bytes=64 << 20, consume_once=False)
    client = store.client
    total = sum(nbytes_of(f) for _, f in samples)
    raw = [(f"raw{uuid.uuid4().hex[:6]}/{sid}/{name}", bytes(tensor_bytes(t).numpy()))
           for sid, feats in samples for name, t in feats.items()]
    best = {"ours_put": 0.0, "ours_get": 0.0, "raw_put": 0.0, "raw_get": 0.0}
    try:
        for r in range(repeats):  # each timed section moves the same bytes; frees are not timed
            t0 = time.perf_counter()
            refs = [store.put(feats, f"{sid}-{r}") for sid, feats in samples]
            t1 = time.perf_counter()
            for ref in refs:
                _, lease = store.get(ref)  # fresh tensors of the right shape and dtype
                store.release(lease)  # retained store: release frees nothing
            t2 = time.perf_counter()
            for ref in refs:
                store.abort(ref.sample_id)
            keys = [f"{k}-{r}" for k, _ in raw]
            t3 = time.perf_counter()
            for key, (_, data) in zip(keys, raw):
                rc = client.put(key, data)
                assert rc == 0, rc
            t4 = time.perf_counter()
            for key, (_, data) in zip(keys, raw):
                got = client.get(key)  # bytes only: no tensor is built
                assert len(got) == len(data)
            t5 = time.perf_counter()
            client.batch_remove(keys, True)
            for name, dt in (("ours_put", t1 - t0), ("ours_get", t2 - t1), ("raw_put", t4 - t3), ("raw_get", t5 - t4)):
                best[name] = max(best[name], total / dt / 1e9)
    finally:
        store.close()
    return best


# --------------------------------------------------------------------------- trainer data wait


def data_wait(args, cfg: PrepareConfig, source: str, tmp: Path, store: StoreSpec | None = None) -> dict[str, float]:
    import lightning as L

    from specforge_lightning.algorithms.eagle3 import Eagle3Module
    from specforge_lightning.callbacks.stream_health import StreamHealth
    from specforge_lightning.datamodules import StreamDataModule
    from specforge_lightning.target.producer import ProducerConfig, run_producer

    if source == "ledger":
        # The producer runs ahead, to completion (in another terminal in real use). Not on a thread
        # here: transformers' from_pretrained flips torch's default dtype process-wide while loading.
        pc = ProducerConfig(prepare=cfg, ledger=str(tmp / "ledger.sqlite"), store=store)
        run_producer(pc)
        dm = StreamDataModule(source="ledger", prepare=cfg, batch_size=args.batch_size, ledger=pc.ledger, store=store)
    else:
        dm = StreamDataModule(source="colocated", prepare=cfg, batch_size=args.batch_size)
    health = StreamHealth()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[health])
    t0 = time.perf_counter()
    trainer.fit(Eagle3Module(ttt_length=3), datamodule=dm)
    wall = time.perf_counter() - t0
    s = health.summary()
    return {"steps": s["steps"], "wall_s": wall, "data_wait_fraction": s["data_wait_fraction"],
            "data_wait_s": s["data_wait_s"], "producer_samples_per_s": s.get("producer_samples_per_s", 0.0)}


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--capture_batch", type=int, default=8)
    p.add_argument("--shard_size", type=int, default=8, help="capture chunk: the colocated first-batch latency")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--draft_vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-mooncake", dest="mooncake", action="store_false")
    p.add_argument("--no-train", dest="train", action="store_false")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        cfg = prepare_cfg(args, tmp / "unused")
        plan = plan_stream(cfg)
        engine = plan.load_engine()
        t0 = time.perf_counter()
        samples = [(plan.train[pos].task_id, f) for pos, f in capture_in_order(
            engine, plan.train, plan.layer_ids, chunk_size=cfg.shard_size, batch_size=cfg.batch_size) if f is not None]
        wall = time.perf_counter() - t0
        tokens = sum(int(f["input_ids"].numel()) for _, f in samples)
        mb = sum(nbytes_of(f) for _, f in samples) / 1e6
        print(f"features: {len(samples)} SmolLM2 samples, {tokens} tokens, {mb:.1f} MB ({mb / len(samples):.2f} MB/sample)")
        print(f"capture (HF bf16, {args.threads} threads): {len(samples) / wall:.2f} samples/s, {tokens / wall:.0f} tokens/s")
        del engine
        # Data-plane copies are small: one intra-op thread avoids OpenMP wake-ups on a busy machine.
        torch.set_num_threads(1)

        results = {}
        local = LocalFeatureStore(consume_once=True)
        mem = InMemoryLedger()
        results["local"] = data_plane(samples, lambda: (local, local), lambda: (mem, mem), args.batch_size)

        def shared_dir():
            root = tmp / f"store-{uuid.uuid4().hex[:6]}"
            return (build_store(StoreSpec(root=str(root)), consume_once=False),
                    build_store(StoreSpec(root=str(root)), consume_once=False))

        def sqlite():
            path = tmp / f"ledger-{uuid.uuid4().hex[:6]}.sqlite"
            return SqliteLedger(path), SqliteLedger(path)

        results["shared_dir"] = data_plane(samples, shared_dir, sqlite, args.batch_size)
        master = None
        if args.mooncake:
            master = mooncake_master()
            addr, meta = master.__enter__()
            spec = StoreSpec(kind="mooncake", master_address=addr, metadata_server=meta,
                             prefix=f"e2e{uuid.uuid4().hex[:6]}", producer_segment_bytes=256 << 20,
                             local_buffer_bytes=128 << 20, staging_bytes=32 << 20)
            results["mooncake"] = data_plane(
                samples,
                lambda: (build_store(spec, consume_once=False, producer=True), build_store(spec, consume_once=False)),
                sqlite, args.batch_size,
            )
        print("data plane end to end (put, publish, lease, get, collate, durable ack, free), batch", args.batch_size)
        for name, (sps, mbps) in results.items():
            print(f"  {name:<10} {sps:8.1f} samples/s  {mbps:8.1f} MB/s")
        if master is not None:
            master.__exit__(None, None, None)
            with mooncake_master() as (addr, meta):  # a fresh cluster: no segments of closed clients linger
                r = mooncake_vs_raw(samples, addr, meta, args.repeats)
            print("Mooncake, best of", args.repeats, "(GB/s): ours vs raw MooncakeDistributedStore bytes API")
            print(f"  put {r['ours_put']:.3f} vs {r['raw_put']:.3f}  ratio {r['ours_put'] / r['raw_put']:.2f}x")
            print(f"  get {r['ours_get']:.3f} vs {r['raw_get']:.3f}  ratio {r['ours_get'] / r['raw_get']:.2f}x")
        if args.train:
            for source in ("colocated", "ledger"):
                store = StoreSpec(root=str(tmp / f"train-store-{source}")) if source == "ledger" else None
                w = data_wait(args, cfg, source, tmp / source, store)
                print(f"trainer ({source}): {w['steps']} steps in {w['wall_s']:.1f} s, data wait "
                      f"{w['data_wait_s']:.2f} s = {100 * w['data_wait_fraction']:.1f}% of the wall time, "
                      f"producer {w['producer_samples_per_s']:.2f} samples/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
