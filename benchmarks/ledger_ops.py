"""Benchmark: ledger operations per second (publish, lease, ack) for SQLite and Redis on this machine,
and the trainer's data-wait fraction with each ledger in a disaggregated run.

    python benchmarks/ledger_ops.py [--n 2000] [--batch 8] [--no-train]

Ops are single calls from one client, the way the producer (one publish per ref) and a trainer
(lease a batch, ack it at the optimizer step) use the ledger; ``--batch`` refs per lease/ack.
Redis runs as a private Debian ``redis-server`` on 127.0.0.1 with ``appendonly yes`` and
``appendfsync`` always (every ack durable, like SQLite's ``synchronous=FULL``) or everysec.
The data-wait part trains EAGLE3 on the tiny target (``tiny-llama``), the producer ahead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from specforge_lightning.contracts import FeatureSpec, SampleRef  # noqa: E402
from specforge_lightning.control.ledger import Ledger  # noqa: E402
from specforge_lightning.control.ledger_uri import open_ledger  # noqa: E402


def make_ref(i: int) -> SampleRef:
    sid = f"bench{i:07d}"
    return SampleRef(sample_id=sid, store_uri=f"shared_dir://{sid}", feature_keys={"h": f"{sid}/h"},
                     feature_specs=(FeatureSpec("h", (1, 128, 576), "bfloat16"),), strategy="eagle3", num_tokens=128)


@contextmanager
def redis_server(tmp: Path, fsync: str):
    """A private redis-server on a free 127.0.0.1 port; stopped by its pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp / f"redis-{fsync}"
    folder.mkdir()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", fsync, "--dir", str(folder), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0?stream=bench&dir={folder}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


def ops_per_s(ledger: Ledger, n: int, batch: int) -> dict[str, float]:
    refs = [make_ref(i) for i in range(n)]
    t0 = time.perf_counter()
    for r in refs:
        ledger.publish([r])
    publish = n / (time.perf_counter() - t0)
    leases, t0 = [], time.perf_counter()
    for _ in range(n // batch):
        leases.append([r.sample_id for r in ledger.lease("bench", batch, 600)])
    lease = len(leases) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for ids in leases:
        ledger.ack("bench", ids)
    ack = len(leases) / (time.perf_counter() - t0)
    assert ledger.counts()["acked"] == len(leases) * batch
    return {"publish/s": publish, "lease/s": lease, "ack/s": ack}


def data_wait(ledger: str, tmp: Path, steps: int) -> dict[str, float]:
    import lightning as L

    from specforge_lightning.algorithms.eagle3 import Eagle3Module
    from specforge_lightning.callbacks.stream_health import StreamHealth
    from specforge_lightning.data.stores.spec import StoreSpec
    from specforge_lightning.datamodules import StreamDataModule
    from specforge_lightning.target.prepare import PrepareConfig
    from specforge_lightning.target.producer import ProducerConfig, run_producer

    cfg = PrepareConfig(output_dir=str(tmp / "unused"), target="tiny-llama", num_samples=4 * steps + 8,
                        num_val_samples=0, max_length=64, draft_vocab_size=64, batch_size=4, shard_size=4,
                        capture_dtype="float32", compute_dtype="float32", layer_preset="eagle3")
    store = StoreSpec(kind="shared_dir", root=str(tmp / "store"))
    run_producer(ProducerConfig(prepare=cfg, ledger=ledger, store=store))  # ahead, as on another host
    dm = StreamDataModule(source="ledger", prepare=cfg, batch_size=4, ledger=ledger, store=store)
    health = StreamHealth()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[health])
    t0 = time.perf_counter()
    trainer.fit(Eagle3Module(ttt_length=2), datamodule=dm)
    s = health.summary()
    return {"steps": s["steps"], "wall_s": time.perf_counter() - t0, "data_wait_s": s["data_wait_s"],
            "data_wait_fraction": s["data_wait_fraction"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="refs published (one per call)")
    p.add_argument("--batch", type=int, default=8, help="refs per lease and per ack")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of the data-wait fit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-train", dest="train", action="store_false")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as t:
        tmp = Path(t)
        rows = {}
        (tmp / "sqlite").mkdir()
        with open_ledger(tmp / "sqlite" / "ledger.sqlite") as lg:
            rows["sqlite (WAL, synchronous=FULL)"] = ops_per_s(lg, args.n, args.batch)
        for fsync in ("always", "everysec"):
            with redis_server(tmp, fsync) as url, open_ledger(url) as lg:
                rows[f"redis (AOF, appendfsync {fsync})"] = ops_per_s(lg, args.n, args.batch)
        print(f"{args.n} publishes of 1 ref, {args.n // args.batch} leases and acks of {args.batch} refs, one client:")
        for name, r in rows.items():
            print(f"  {name:34s} " + "  ".join(f"{k} {v:8.0f}" for k, v in r.items()))
        if args.train:
            for kind in ("sqlite", "redis"):
                sub = tmp / f"train-{kind}"
                sub.mkdir()
                if kind == "sqlite":
                    w = data_wait(str(sub / "stream" / "ledger.sqlite"), sub, args.steps)
                else:
                    with redis_server(sub, "always") as url:
                        w = data_wait(url.replace("stream=bench", "stream=train"), sub, args.steps)
                print(f"trainer ({kind} ledger, disaggregated, shared-dir store): {w['steps']} steps in "
                      f"{w['wall_s']:.1f} s, data wait {w['data_wait_s']:.2f} s = "
                      f"{100 * w['data_wait_fraction']:.1f}% of the wall time")


if __name__ == "__main__":
    main()
