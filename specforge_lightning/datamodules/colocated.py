"""Colocated set-up of a StreamDataModule: plan the capture, capture validation once, start no thread yet.

The capture thread (``target/colocated.py``) starts with the first train loader;
this module only builds it, the manifest and the FeatureContext the algorithm sees.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specforge_lightning.contracts import FeatureContext, SampleRef, StrategySpec
from specforge_lightning.data.manifest import (
    IDENTITY_FIELDS,
    VOCAB_FILE,
    RefCheck,
    check_identity,
    feature_context,
    read_manifest,
)
from specforge_lightning.data.stores.shards import write_shard
from specforge_lightning.data.stores.local import LocalFeatureStore
from specforge_lightning.data.vocab import save_vocab_mapping
from specforge_lightning.datamodules.checks import check_features
from specforge_lightning.target.capture import capture_in_order
from specforge_lightning.target.colocated import ColocatedRefSource
from specforge_lightning.target.engine import TargetEngine
from specforge_lightning.target.prepare import PrepareConfig
from specforge_lightning.target.producer import StreamPlan, plan_stream
from specforge_lightning.target.zoo import resolve_target

log = logging.getLogger(__name__)


@dataclass
class ColocatedSetup:
    """What a colocated StreamDataModule holds once set up."""

    source: ColocatedRefSource
    manifest: dict[str, Any]
    context: FeatureContext
    val: tuple[LocalFeatureStore, list[SampleRef]] | None
    tmp: tempfile.TemporaryDirectory | None  # the vocab folder when nothing is saved; lives until the process exits


def open_colocated(
    cfg: PrepareConfig,
    spec: StrategySpec | None,
    *,
    rank: int,
    world: int,
    save_dir: str | None,
    epochs: int,
    shuffle: bool,
    seed: int,
    high_watermark: int,
    low_watermark: int,
    max_resident_bytes: int | None,
) -> ColocatedSetup:
    """Plan the capture of ``cfg`` for ``spec``, capture the validation split, build (not start) the thread."""
    plan = plan_stream(cfg, spec)
    manifest = dict(plan.manifest)
    check_features(manifest, cfg, spec, "the colocated features")
    save = _save_dir(save_dir, manifest, world, shuffle)
    tmp = None
    if save is not None:
        work = save
    else:
        tmp = tempfile.TemporaryDirectory(prefix="specforge-colocated-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    save_vocab_mapping(work / VOCAB_FILE, plan.d2t, plan.t2d)
    context = feature_context(manifest, work, resolve_target(manifest["target"], cfg.cache_dir))
    engine = plan.load_engine()
    manifest["splits"] = {}
    val = _capture_val(engine, plan, save, manifest) if plan.val else None
    source = ColocatedRefSource(
        engine,
        plan.train,
        plan.layer_ids,
        batch_size=cfg.batch_size,
        chunk_size=cfg.shard_size,
        provenance=plan.provenance(),
        high_watermark=high_watermark,
        low_watermark=low_watermark,
        max_resident_bytes=max_resident_bytes,
        epochs=epochs,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world,
        save_dir=save,
        manifest=manifest,
        check=RefCheck(manifest, spec.features if spec else None),
    )
    return ColocatedSetup(source, manifest, context, val, tmp)


def _save_dir(save_dir: str | None, manifest: dict[str, Any], world: int, shuffle: bool) -> Path | None:
    """Where to also save the features as prepared shards, or None (not asked, already saved, or impossible)."""
    save = Path(save_dir) if save_dir else None
    if save is not None:
        existing = read_manifest(save)
        if existing is not None:
            check_identity(
                existing, manifest, IDENTITY_FIELDS,
                f"{save} holds features captured differently ({{diff}}); pick another save_dir",
            )
            if existing.get("complete"):
                log.warning("%s already holds these features: FeatureDataModule can train on them offline", save)
                save = None
    if save is not None and (world > 1 or shuffle):
        log.warning("save_dir is ignored with %d ranks / shuffle=%s: shards must hold every task in order", world, shuffle)
        save = None
    return save


def _capture_val(
    engine: TargetEngine, plan: StreamPlan, save_dir: Path | None, manifest: dict[str, Any]
) -> tuple[LocalFeatureStore, list[SampleRef]]:
    """Validation features, captured once up front into a retained store (and saved as val shards)."""
    cfg = plan.cfg
    store = LocalFeatureStore()
    refs, chunk, shards = [], [], []
    for pos, feats in capture_in_order(engine, plan.val, plan.layer_ids, chunk_size=cfg.shard_size, batch_size=cfg.batch_size):
        task = plan.val[pos]
        if feats is not None:
            refs.append(store.put(feats, task.task_id))
            chunk.append((task.task_id, feats))
        if save_dir is not None and (pos % cfg.shard_size == cfg.shard_size - 1 or pos == len(plan.val) - 1):
            if chunk:
                rel = f"val/shard_{pos // cfg.shard_size:05d}.safetensors"
                write_shard(save_dir / rel, chunk, {"split": "val", "target": cfg.target})
                shards.append(rel)
            chunk = []
    manifest["splits"]["val"] = {
        "shards": shards,
        "num_samples": len(plan.val),
        "num_tokens": sum(t.num_tokens for t in plan.val),
        "num_supervised": sum(t.num_supervised for t in plan.val),
    }
    return store, refs
