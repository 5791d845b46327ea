"""Offline capture: conversations → target features on disk, with a manifest.

Layout of a prepared directory::

    manifest.json              what was captured, from what, and how far it got
    vocab_mapping.safetensors  d2t / t2d for the draft vocabulary
    train/shard_00000.safetensors, ...   (data/shards.py format)
    val/shard_00000.safetensors, ...

Shards are deterministic slices of the task list, so a rerun skips the shards
that already exist and are readable. A directory whose manifest disagrees with
the request is refused, naming the field.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.contracts import SCHEMA_VERSION, PromptTask, StrategySpec
from specforge_lightning.data import corpus as corpus_lib
from specforge_lightning.data.chat import template_hash, tokenize_conversation, tokenizer_hash
from specforge_lightning.data.manifest import (
    STANDARD_FEATURES,
    VOCAB_FILE,
    manifest_mismatch,
    read_manifest,
    write_manifest,
)
from specforge_lightning.data.stores.shards import ShardError, read_shard_index, write_shard
from specforge_lightning.data.vocab import build_vocab_mapping, count_supervised_tokens, coverage, save_vocab_mapping
from specforge_lightning.target.capture import has_nan
from specforge_lightning.target.engine import HFTargetEngine
from specforge_lightning.target.layers import planned_layer_ids
from specforge_lightning.target.regenerate import prompt_ids, regenerate_tasks
from specforge_lightning.target.zoo import resolve_target, weights_hash


@dataclass
class PrepareConfig:
    """Everything that decides which features a prepared directory holds."""

    output_dir: str = "outputs/features/eagle3-smollm2"
    target: str = "smollm2-135m-instruct"
    corpus: str = "sharegpt"
    num_samples: int = 200
    num_val_samples: int = 20
    skip_samples: int = 0
    max_length: int = 256
    max_messages: int | None = None
    train_only_last_turn: bool = False
    # None: the algorithm's preset (StrategySpec.layer_preset); ``eagle3`` or ``spread:<count>``.
    layer_preset: str | None = None
    layer_ids: list[int] | None = None
    draft_vocab_size: int = 8192
    batch_size: int = 8
    shard_size: int = 64
    capture_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    # Re-answer each first user turn with the target's own greedy reply (see target/regenerate.py).
    regenerate: bool = False
    regenerate_max_new_tokens: int = 192
    regenerate_batch_size: int = 16
    # How many train conversations get regenerated answers (None: all). The rest keep the corpus's
    # own answers: they cost ~5x less per token (one capture pass, no generation), and their
    # labels are still the target's own predictions. Validation is always regenerated.
    regenerate_samples: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.regenerate_samples is not None and not self.regenerate:
            raise ValueError("regenerate_samples needs regenerate: true")
        if self.regenerate_samples is not None and not 0 <= self.regenerate_samples <= self.num_samples:
            raise ValueError(
                f"regenerate_samples must be between 0 and num_samples ({self.num_samples}), "
                f"got {self.regenerate_samples}"
            )


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config names (``bfloat16``, ``float32``, ...)."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use e.g. 'bfloat16' or 'float32'")
    return value


@dataclass
class TaskPlan:
    """Train and val PromptTasks, plus where in the corpus reading stopped.

    ``corpus_end`` is the index of the first conversation never read: evaluation
    takes its held-out prompts from there on, so they never overlap training.
    """

    train: list[PromptTask]
    val: list[PromptTask]
    dropped: int
    corpus_end: int


def _conversations(cfg: PrepareConfig, start: int | None = None):
    """``(index, messages)`` from ``start`` (default ``skip_samples``) on, read in chunks, cut to ``max_messages``."""
    position = cfg.skip_samples if start is None else start
    while True:
        chunk = corpus_lib.load_conversations(cfg.corpus, limit=256, skip=position)
        for messages in chunk:
            yield position, messages[: cfg.max_messages] if cfg.max_messages else messages
            position += 1
        if len(chunk) < 256:
            return


def build_tasks(cfg: PrepareConfig, tokenizer, model=None, cache_file: Path | None = None) -> TaskPlan:
    """Tokenize conversations into train and val PromptTasks.

    Conversations that give fewer than two supervised tokens (e.g. a prompt that
    fills ``max_length``) are dropped and counted. With ``cfg.regenerate`` the
    supervised text is the target's own greedy reply to each first user turn
    (``model`` required, cached in ``cache_file``) for the validation split and
    the first ``regenerate_samples`` train conversations; the remaining train
    conversations follow them in the corpus and keep their own answers.
    """
    if not cfg.regenerate:
        tasks, dropped, end = _corpus_tasks(cfg, tokenizer, cfg.skip_samples, cfg.num_samples + cfg.num_val_samples)
        # Validation comes from the END of the slice, so growing num_samples never leaks val into train.
        return TaskPlan(tasks[: cfg.num_samples], tasks[cfg.num_samples :], dropped, end)
    if model is None:
        raise ValueError("regenerate=true needs the target model")
    n_regen = cfg.num_samples if cfg.regenerate_samples is None else cfg.regenerate_samples
    regen, dropped, end = _regenerated(cfg, tokenizer, model, cache_file, n_regen + cfg.num_val_samples)
    own, more_dropped, end = _corpus_tasks(cfg, tokenizer, end, cfg.num_samples - n_regen)
    return TaskPlan(regen[:n_regen] + own, regen[n_regen:], dropped + more_dropped, end)


def _corpus_tasks(cfg: PrepareConfig, tokenizer, start: int, count: int) -> tuple[list[PromptTask], int, int]:
    """``count`` conversations from corpus index ``start`` on, with their own answers: (tasks, dropped, end)."""
    tasks: list[PromptTask] = []
    dropped, end = 0, start
    if count == 0:
        return tasks, dropped, end
    for index, messages in _conversations(cfg, start):
        end = index + 1
        ids, mask = tokenize_conversation(
            tokenizer, messages, cfg.max_length, train_only_last_turn=cfg.train_only_last_turn
        )
        if sum(mask) < 2:
            dropped += 1
            continue
        tasks.append(PromptTask(f"c{index:06d}", tuple(ids), tuple(mask), {"corpus": cfg.corpus}))
        if len(tasks) == count:
            return tasks, dropped, end
    raise ValueError(f"corpus {cfg.corpus!r} gave only {len(tasks)} usable conversations, {count} requested")


def _regenerated(cfg: PrepareConfig, tokenizer, model, cache_file: Path | None, total: int):
    """``total`` regenerated tasks from ``skip_samples`` on: (tasks, dropped, end)."""
    # Prompts that leave no room for an answer are skipped before any generation;
    # a few spares cover answers that come back (nearly) empty.
    wanted = total + max(4, total // 50)
    named, end = [], cfg.skip_samples
    for index, messages in _conversations(cfg):
        end = index + 1
        if prompt_ids(tokenizer, messages, cfg.max_length - 8) is not None:
            named.append((f"c{index:06d}", messages))
            if len(named) == wanted:
                break
    tasks = regenerate_tasks(
        model,
        tokenizer,
        named,
        max_length=cfg.max_length,
        max_new_tokens=cfg.regenerate_max_new_tokens,
        batch_size=cfg.regenerate_batch_size,
        cache_file=cache_file,
    )
    usable = [t for t in tasks if t.num_supervised >= 2][:total]
    if len(usable) < total:
        raise ValueError(f"corpus {cfg.corpus!r} gave only {len(usable)} usable regenerated answers, {total} requested")
    return usable, (end - cfg.skip_samples) - len(usable), end


def feature_identity(cfg: PrepareConfig, target_dir: Path, tokenizer, layer_ids: list[int]) -> dict[str, Any]:
    """The manifest fields that define what the features ARE (see data.manifest.IDENTITY_FIELDS)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "target": cfg.target,
        "target_weights_hash": weights_hash(target_dir),
        "layer_ids": layer_ids,
        "capture_dtype": cfg.capture_dtype,
        "max_length": cfg.max_length,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template_hash": template_hash(tokenizer),
        "corpus": cfg.corpus,
        "skip_samples": cfg.skip_samples,
        "num_samples": cfg.num_samples,
        "num_val_samples": cfg.num_val_samples,
        "max_messages": cfg.max_messages,
        "train_only_last_turn": cfg.train_only_last_turn,
        "draft_vocab_size": cfg.draft_vocab_size,
        "shard_size": cfg.shard_size,
        "regenerate": cfg.regenerate,
        "regenerate_max_new_tokens": cfg.regenerate_max_new_tokens if cfg.regenerate else None,
        "regenerate_samples": cfg.regenerate_samples if cfg.regenerate else None,
    }


def describe_features(identity, target_dir, tokenizer, hf_config, plan: TaskPlan, t2d) -> dict[str, Any]:
    """Identity plus the facts a consumer needs (sizes, vocab file, draft-vocab coverage, corpus range)."""
    counts = count_supervised_tokens((t.input_ids, t.loss_mask) for t in plan.train)
    val_counts = count_supervised_tokens((t.input_ids, t.loss_mask) for t in plan.val)
    return {
        **identity,
        "format": "specforge-features",
        "target_id": Path(target_dir).name,
        "hidden_size": int(hf_config.hidden_size),
        "num_layers": int(hf_config.num_hidden_layers),
        "vocab_size": len(tokenizer),
        "vocab_mapping": VOCAB_FILE,
        "features": list(STANDARD_FEATURES),
        "draft_vocab_coverage": {"train": coverage(counts, t2d), "val": coverage(val_counts, t2d)},
        "dropped_conversations": plan.dropped,
        "corpus_end": plan.corpus_end,
    }


def prepare(cfg: PrepareConfig, spec: StrategySpec | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Capture features for ``cfg``; restartable; returns the final manifest.

    ``spec`` supplies the layer preset when ``cfg`` names no layers.
    """
    from transformers import AutoConfig, AutoTokenizer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target_dir = resolve_target(cfg.target, cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    hf_config = AutoConfig.from_pretrained(str(target_dir))
    layer_ids = planned_layer_ids(hf_config.num_hidden_layers, cfg.layer_preset, cfg.layer_ids, spec)

    identity = feature_identity(cfg, target_dir, tokenizer, layer_ids)
    existing = read_manifest(out)
    if existing is not None:
        diff = manifest_mismatch(existing, identity)
        if diff:
            raise ValueError(f"{out} holds features prepared differently ({diff}); use another output_dir")
        if existing.get("complete"):
            return existing

    engine = None
    model = None
    if cfg.regenerate:
        engine = HFTargetEngine.from_path(
            str(target_dir), dtype=torch_dtype(cfg.compute_dtype), capture_dtype=torch_dtype(cfg.capture_dtype)
        )
        model = engine.model
    plan = build_tasks(cfg, tokenizer, model, out / "regenerated.jsonl")
    train, val = plan.train, plan.val
    counts = count_supervised_tokens((t.input_ids, t.loss_mask) for t in train)
    d2t, t2d = build_vocab_mapping(counts, len(tokenizer), cfg.draft_vocab_size)
    save_vocab_mapping(out / VOCAB_FILE, d2t, t2d)
    manifest = {
        **describe_features(identity, target_dir, tokenizer, hf_config, plan, t2d),
        "complete": False,
        "splits": {},
    }
    write_manifest(out, manifest)

    stats = {"nan_skipped": 0, "captured_tokens": 0, "seconds": 0.0}
    for split, tasks in (("train", train), ("val", val)):
        shards = []
        num_shards = math.ceil(len(tasks) / cfg.shard_size)
        (out / split).mkdir(exist_ok=True)
        for shard_index in range(num_shards):
            rel = f"{split}/shard_{shard_index:05d}.safetensors"
            shards.append(rel)
            if _shard_is_complete(out / rel):
                continue
            if engine is None:
                engine = HFTargetEngine.from_path(
                    str(target_dir), dtype=torch_dtype(cfg.compute_dtype), capture_dtype=torch_dtype(cfg.capture_dtype)
                )
            chunk = tasks[shard_index * cfg.shard_size : (shard_index + 1) * cfg.shard_size]
            samples = _capture_chunk(engine, chunk, layer_ids, cfg.batch_size, stats, progress, rel)
            write_shard(out / rel, samples, {"split": split, "target": cfg.target})
        manifest["splits"][split] = {
            "shards": shards,
            "num_samples": len(tasks),
            "num_tokens": sum(t.num_tokens for t in tasks),
            "num_supervised": sum(t.num_supervised for t in tasks),
        }
    manifest["nan_skipped"] = manifest.get("nan_skipped", 0) + stats["nan_skipped"]
    if stats["seconds"]:
        manifest["capture_tokens_per_s"] = round(stats["captured_tokens"] / stats["seconds"], 1)
    manifest["complete"] = True
    write_manifest(out, manifest)
    return manifest


def _shard_is_complete(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        read_shard_index(path)
        return True
    except ShardError:
        path.unlink()  # half-written or corrupt: capture it again
        return False


def _capture_chunk(engine, tasks, layer_ids, batch_size, stats, progress, label):
    from rich.progress import Progress

    samples = []
    # Length-sorted batches waste less compute on padding; output order stays the task order.
    order = sorted(range(len(tasks)), key=lambda i: tasks[i].num_tokens)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task(f"capture {label}", total=len(tasks))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            t0 = time.perf_counter()
            feats = engine.capture([tasks[i] for i in idx], layer_ids)
            stats["seconds"] += time.perf_counter() - t0
            for i, f in zip(idx, feats):
                stats["captured_tokens"] += tasks[i].num_tokens
                if has_nan(f):
                    stats["nan_skipped"] += 1
                    continue
                captured[i] = f
            bar.advance(job, len(idx))
    for i in range(len(tasks)):
        if i in captured:
            samples.append((tasks[i].task_id, captured[i]))
    return samples

