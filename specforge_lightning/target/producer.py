"""The feature producer of a disaggregated run: conversations in, refs on a ledger out.

    python -m specforge_lightning produce --config configs/eagle3-tiny-stream.yaml

It reads the same YAML as ``fit`` (``data.init_args``: ``prepare``, ``ledger``,
``store``, ``epochs``, ``shuffle``, ``seed``, watermarks), tokenizes the
conversations exactly as ``prepare`` does, captures them with the HF target, puts
each sample into the shared store and only then publishes its ref (a killed
producer never exposes a half-written sample). It pauses while the ledger's queue
is above the high watermark and resumes below the low one, and marks the stream
done at the end. Restarted on the same ledger, it continues where it stopped.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.contracts import PromptTask, StrategySpec
from specforge_lightning.control.producer import (
    STREAM_MANIFEST,
    STREAM_VOCAB,
    ProducerProgress,
    Publisher,
    claim_store_root,
    producer_lock,
    read_stream_manifest,
    stream_file,
    write_stream_manifest,
)
from specforge_lightning.control.ledger_uri import open_ledger, stream_dir
from specforge_lightning.data.loader import distributed_indices
from specforge_lightning.data.manifest import IDENTITY_FIELDS, check_identity
from specforge_lightning.data.stores.spec import StoreSpec, build_store, put_with_retry
from specforge_lightning.data.vocab import build_vocab_mapping, count_supervised_tokens, save_vocab_mapping
from specforge_lightning.target.capture import capture_in_order, epoch_sample_ids
from specforge_lightning.target.engine import TargetEngine
from specforge_lightning.target.layers import planned_layer_ids
from specforge_lightning.target.identity import feature_identity, load_tokenizer
from specforge_lightning.target.prepare import PrepareConfig, build_tasks, describe_features
from specforge_lightning.target.sglang_engine import check_engine_config, close_engine, open_engine
from specforge_lightning.target.zoo import resolve_target

log = logging.getLogger(__name__)

STREAM_IDENTITY_FIELDS = (*IDENTITY_FIELDS, "stream")


@dataclass
class StreamPlan:
    """Everything a capture needs, computed once from a PrepareConfig (no model loaded yet)."""

    cfg: PrepareConfig
    target_dir: Path
    layer_ids: list[int]
    train: list[PromptTask]
    val: list[PromptTask]
    d2t: torch.Tensor
    t2d: torch.Tensor
    manifest: dict[str, Any]  # prepare's identity fields and model facts; no splits yet

    def load_engine(self) -> TargetEngine:
        """The engine ``data.prepare.engine`` names (an SGLang one holds a server: ``close_engine`` it)."""
        return open_engine(self.cfg, self.target_dir, self.layer_ids)

    def provenance(self) -> dict[str, Any]:
        keys = ("target", "target_weights_hash", "layer_ids", "capture_dtype", "tokenizer_hash", "chat_template_hash")
        return {k: self.manifest[k] for k in keys}


def plan_stream(cfg: PrepareConfig, spec: StrategySpec | None = None) -> StreamPlan:
    """Tasks, vocab mapping and manifest identity for ``cfg``, computed the way ``prepare`` computes them.

    ``spec`` supplies the layer preset when ``cfg`` names no layers; ``auto`` dtypes are
    decided for this machine first (the stream's manifest records the result).
    """
    from transformers import AutoConfig

    cfg = cfg.resolved()
    target_dir = resolve_target(cfg.target, cfg.cache_dir)
    tokenizer = load_tokenizer(target_dir)
    hf_config = AutoConfig.from_pretrained(str(target_dir))
    layer_ids = planned_layer_ids(hf_config.num_hidden_layers, cfg.layer_preset, cfg.layer_ids, spec)
    check_engine_config(cfg, hf_config.num_hidden_layers, layer_ids)  # before any work
    plan = build_tasks(cfg, tokenizer)
    train, val = plan.train, plan.val
    d2t, t2d = build_vocab_mapping(
        count_supervised_tokens((t.input_ids, t.loss_mask) for t in train), len(tokenizer), cfg.draft_vocab_size
    )
    identity = feature_identity(cfg, Path(target_dir), tokenizer, layer_ids)
    manifest = describe_features(identity, target_dir, tokenizer, hf_config, plan, t2d)
    missing = [k for k in IDENTITY_FIELDS if k not in manifest]
    assert not missing, f"stream manifest lacks identity fields {missing}"
    return StreamPlan(cfg, Path(target_dir), layer_ids, train, val, d2t, t2d, manifest)


@dataclass
class ProducerConfig:
    """A producer run. ``wait_drained`` (None: only for Mooncake, whose objects live in the
    producer's segment) keeps the producer alive after the last publish until every ref is acked."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    ledger: str = "outputs/stream/ledger.sqlite"
    store: StoreSpec = field(default_factory=StoreSpec)
    epochs: int = 1
    shuffle: bool = False
    seed: int = 0
    high_watermark: int = 64
    low_watermark: int = 32
    put_retry_s: float = 600.0
    wait_drained: bool | None = None
    log_every_s: float = 10.0


def stream_manifest(cfg: ProducerConfig, plan: StreamPlan) -> dict[str, Any]:
    return {
        **plan.manifest,
        "vocab_mapping": STREAM_VOCAB,
        "stream": {
            "epochs": cfg.epochs,
            "shuffle": cfg.shuffle,
            "seed": cfg.seed,
            "num_tasks": len(plan.train),
            "store": cfg.store.kind,
        },
    }


def run_producer(
    cfg: ProducerConfig,
    spec: StrategySpec | None = None,
    *,
    stop: threading.Event | None = None,
    engine: TargetEngine | None = None,
) -> dict[str, Any]:
    """Produce the whole stream (or the rest of it, after a restart); returns run statistics.

    ``spec`` (the trainers' algorithm) supplies the layer preset when ``cfg.prepare`` names none.
    """
    ledger_path = cfg.ledger  # a SQLite path or a redis:// URI (control/ledger_uri.py)
    stream_dir(ledger_path).mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    with producer_lock(ledger_path):
        plan = plan_stream(cfg.prepare, spec)
        announced, existing = stream_manifest(cfg, plan), read_stream_manifest(ledger_path)
        if existing is not None:
            check_identity(
                existing, announced, STREAM_IDENTITY_FIELDS,
                f"{stream_file(ledger_path, STREAM_MANIFEST)} announces a different stream ({{diff}}); "
                "use a fresh ledger folder for a different stream",
            )
        if cfg.store.kind == "shared_dir" and cfg.store.root:
            claim_store_root(cfg.store.root, ledger_path)  # before the stream writes: a refusal changes nothing
        save_vocab_mapping(stream_file(ledger_path, STREAM_VOCAB), plan.d2t, plan.t2d)
        write_stream_manifest(ledger_path, announced, STREAM_IDENTITY_FIELDS)
        ledger = open_ledger(ledger_path)
        store = None
        owned_engine = None
        try:
            if ledger.is_done():
                log.info("the stream on %s is already complete; nothing to produce", ledger_path)
                return {"published": ledger.counts()["published"], "published_now": 0, "complete": True}
            progress = ProducerProgress(ledger_path)
            point = progress.resume(ledger.counts()["published"])
            if point.next_index or point.published:
                log.info("resuming at task position %d (%d refs already published)", point.next_index, point.published)
            store = build_store(cfg.store, consume_once=False, producer=True)
            if engine is None:
                engine = owned_engine = plan.load_engine()
            publisher = Publisher(
                ledger, progress, high_watermark=cfg.high_watermark, low_watermark=cfg.low_watermark,
                published=point.published, log_every_s=cfg.log_every_s,
            )
            stats = _produce(cfg, plan, engine, store, publisher, point, stop)
            if stop.is_set():
                return stats
            publisher.finish()
            log.info("stream complete: %s", publisher.summary_line())
            wait = cfg.wait_drained if cfg.wait_drained is not None else cfg.store.kind == "mooncake"
            if wait:
                log.info("waiting for the trainers to ack every ref (this producer holds the features)")
                while not publisher.wait_drained(timeout_s=0.5):
                    if stop.is_set():
                        break
            return {**stats, "complete": True}
        finally:
            close_engine(owned_engine)  # stops a server this producer launched
            if store is not None:
                store.close()
            ledger.close()


def _produce(cfg, plan, engine, store, publisher, point, stop) -> dict[str, Any]:
    n = len(plan.train)
    skip_published = point.already_published
    check_orphan = point.check_orphan
    nan_skipped = 0
    provenance = plan.provenance()
    t0 = time.monotonic()
    for epoch in range(cfg.epochs):
        base = epoch * n
        if point.next_index >= base + n:
            continue
        order = distributed_indices(n, 1, 0, cfg.seed, epoch, cfg.shuffle)
        ordered = [plan.train[i] for i in order]
        ids = epoch_sample_ids(plan.train, order, epoch)
        start = max(point.next_index - base, 0)
        for pos, feats in capture_in_order(
            engine, ordered, plan.layer_ids, chunk_size=plan.cfg.shard_size, batch_size=plan.cfg.batch_size,
            start=start, stop=stop,
        ):
            after = base + pos + 1
            if feats is None:
                nan_skipped += 1
                publisher.skip(after)
                continue
            if skip_published:  # published just before the last run died: never put it twice
                skip_published -= 1
                publisher.skip(after)
                continue
            publisher.wait(stop.is_set)
            if check_orphan:  # the last run may have died between put and publish
                store.abort(ids[pos])
                check_orphan = False
            ref = put_with_retry(
                store, feats, ids[pos], provenance=provenance, retry_s=cfg.put_retry_s, should_stop=stop.is_set
            )
            publisher.publish(ref, after)
            if stop.is_set():
                break
    elapsed = time.monotonic() - t0
    return {
        "published": publisher.published,
        "published_now": publisher.published_now,
        "samples_per_s": publisher.published_now / elapsed if elapsed > 0 else 0.0,
        "paused_s": publisher.paused_s,
        "nan_skipped": nan_skipped,
        "resumed_from": point.next_index,
    }


# --------------------------------------------------------------------------- CLI


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def _producer_section(path: str) -> dict[str, Any]:
    """``data.init_args`` of a fit config (the keys a producer knows), or a whole producer YAML."""
    node = _read_yaml(path)
    if "data" in node:
        node = node["data"] or {}
        node = node.get("init_args", node)
    known = set(ProducerConfig.__dataclass_fields__)
    return {k: v for k, v in node.items() if k in known}


def config_strategy_spec(path: str) -> StrategySpec | None:
    """The StrategySpec of a fit config's ``model.class_path`` (None for a producer YAML without a model).

    The class is imported by the path the user wrote, as LightningCLI would; the
    producer reads only its declared ``strategy_spec`` (the layer preset).
    """
    model = _read_yaml(path).get("model") or {}
    class_path = model.get("class_path") if isinstance(model, dict) else None
    if not class_path:
        return None
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.strategy_spec


def _config_path(args: list[str]) -> str | None:
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if config is None and "--config" in args and args.index("--config") + 1 < len(args):
        config = args[args.index("--config") + 1]
    return config


def parse_args(args: list[str]) -> ProducerConfig:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="specforge_lightning produce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=str, default=None, help="a fit config (reads data.init_args) or a producer YAML")
    parser.add_class_arguments(ProducerConfig, as_group=False)
    config = _config_path(args)
    if config:
        section = _producer_section(config)
        defaults = asdict(ProducerConfig())
        for key in ("prepare", "store"):  # nested dataclasses: merge over the defaults
            if key in section:
                section[key] = {**defaults[key], **(section[key] or {})}
        parser.set_defaults(**section)
    ns = parser.parse_args(args)
    init = parser.instantiate_classes(ns)
    return ProducerConfig(**{k: getattr(init, k) for k in ProducerConfig.__dataclass_fields__})


def main(args: list[str] | None = None, spec: StrategySpec | None = None) -> None:
    """``produce``: ``spec`` (the CLI passes the algorithm's) else the config's ``model.class_path`` names the layers."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if args is None else args)
    cfg = parse_args(argv)
    config = _config_path(argv)
    if spec is None and config:
        spec = config_strategy_spec(config)
    stats = run_producer(cfg, spec)
    print(
        f"producer: {stats['published']} refs published on {cfg.ledger} "
        f"({stats.get('published_now', 0)} this run, {stats.get('samples_per_s', 0.0):.2f} samples/s)"
    )
