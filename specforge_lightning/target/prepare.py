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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.contracts import PromptTask, StrategySpec
from specforge_lightning.data import corpus as corpus_lib
from specforge_lightning.errors import UserError
from specforge_lightning.data.chat import tokenize_conversation
from specforge_lightning.data.manifest import (
    IDENTITY_FIELDS,
    STANDARD_FEATURES,
    VOCAB_FILE,
    MissingFeaturesError,
    check_identity,
    read_manifest,
    write_manifest,
)
from specforge_lightning.data.stores.shards import damaged_shards, shard_problem, write_shard
from specforge_lightning.data.vocab import (
    build_vocab_mapping,
    count_supervised_tokens,
    coverage,
    save_vocab_mapping,
    vocab_problem,
)
from specforge_lightning.runtime.progress import track
from specforge_lightning.target.capture import has_nan
from specforge_lightning.target.engine import HFTargetEngine
from specforge_lightning.target.sglang_engine import check_engine_config, close_engine, open_engine
from specforge_lightning.target.layers import planned_layer_ids
from specforge_lightning.target.prepare_config import PrepareConfig
from specforge_lightning.target.regenerate import prompt_ids, regenerate_tasks
from specforge_lightning.target.identity import feature_identity, load_tokenizer
from specforge_lightning.target.zoo import resolve_target


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config names (``bfloat16``, ``float32``, ...)."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use e.g. 'bfloat16' or 'float32'")
    return value


NO_ASSISTANT = "no assistant turn"


class CorpusTooSmall(UserError, ValueError):
    """The corpus gave fewer usable conversations than requested; the message counts why the others were dropped."""


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


def _conversations(cfg: PrepareConfig, start: int | None = None, skipped: Counter | None = None):
    """``(index, messages)`` from ``start`` (default ``skip_samples``) on, read in chunks, cut to ``max_messages``.

    ``skipped["no assistant turn"]`` counts the conversations the corpus passed over for a lone user turn.
    """
    position = cfg.skip_samples if start is None else start
    while True:
        shorts: list[int] = []
        chunk = corpus_lib.load_conversations(cfg.corpus, limit=256, skip=position, short_before=shorts)
        for messages, short in zip(chunk, shorts):
            if skipped is not None:
                skipped[NO_ASSISTANT] += short
            yield position, messages[: cfg.max_messages] if cfg.max_messages else messages
            position += 1
        if len(chunk) < 256:
            if skipped is not None and len(shorts) > len(chunk):
                skipped[NO_ASSISTANT] += shorts[len(chunk)]
            return


def _drop_reason(messages, ids, mask, max_length: int) -> str:
    """Why a conversation gave fewer than two supervised tokens (the keys of the corpus error)."""
    if not any(m["role"] == "assistant" for m in messages):
        return NO_ASSISTANT
    if not any(mask) and len(ids) >= max_length:
        return f"a first turn longer than max_length ({max_length} tokens)"
    return "fewer than 2 supervised tokens"


def _too_few(cfg: PrepareConfig, what: str, got: int, count: int, start: int, reasons: Counter) -> CorpusTooSmall:
    why = ", ".join(f"{n} had {reason}" for reason, n in reasons.most_common() if n) or "the corpus ended"
    return CorpusTooSmall(
        f"corpus {cfg.corpus!r} gave only {got} usable {what}, {count} requested (from index {start}: {why}); "
        "lower num_samples / num_val_samples, raise max_length, or use a larger corpus"
    )


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
    """``count`` conversations from corpus index ``start`` on, with their own answers: (tasks, dropped, end).

    ``dropped`` counts the conversations passed over: too few supervised tokens, or no assistant turn at all.
    """
    tasks: list[PromptTask] = []
    reasons: Counter = Counter()
    end = start
    if count == 0:
        return tasks, 0, end
    for index, messages in _conversations(cfg, start, reasons):
        end = index + 1
        ids, mask = tokenize_conversation(
            tokenizer, messages, cfg.max_length, train_only_last_turn=cfg.train_only_last_turn
        )
        if sum(mask) < 2:
            reasons[_drop_reason(messages, ids, mask, cfg.max_length)] += 1
            continue
        tasks.append(PromptTask(f"c{index:06d}", tuple(ids), tuple(mask), {"corpus": cfg.corpus}))
        if len(tasks) == count:
            return tasks, sum(reasons.values()), end
    raise _too_few(cfg, "conversations", len(tasks), count, start, reasons)


def _regenerated(cfg: PrepareConfig, tokenizer, model, cache_file: Path | None, total: int):
    """``total`` regenerated tasks from ``skip_samples`` on: (tasks, dropped, end)."""
    # Prompts that leave no room for an answer are skipped before any generation;
    # a few spares cover answers that come back (nearly) empty.
    wanted = total + max(4, total // 50)
    named, end = [], cfg.skip_samples
    reasons: Counter = Counter()
    for index, messages in _conversations(cfg, skipped=reasons):
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
        reasons[f"a first turn longer than max_length - 8 ({cfg.max_length - 8} tokens) or no assistant turn"] += (
            end - cfg.skip_samples - len(named)
        )
        reasons["an answer of fewer than 2 tokens"] += len(tasks) - len([t for t in tasks if t.num_supervised >= 2])
        raise _too_few(cfg, "regenerated answers", len(usable), total, cfg.skip_samples, reasons)
    return usable, (end - cfg.skip_samples) - len(usable) + reasons[NO_ASSISTANT], end


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

    ``spec`` supplies the layer preset when ``cfg`` names no layers; ``auto`` dtypes are
    decided for this machine first (the manifest records the result).
    """
    from transformers import AutoConfig

    cfg = cfg.resolved()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target_dir = resolve_target(cfg.target, cfg.cache_dir)
    tokenizer = load_tokenizer(target_dir)
    hf_config = AutoConfig.from_pretrained(str(target_dir))
    layer_ids = planned_layer_ids(hf_config.num_hidden_layers, cfg.layer_preset, cfg.layer_ids, spec)
    check_engine_config(cfg, hf_config.num_hidden_layers, layer_ids)  # before any work

    identity = feature_identity(cfg, target_dir, tokenizer, layer_ids)
    existing = read_manifest(out)
    repaired: list[str] = []
    if existing is not None:
        check_identity(
            existing, identity, IDENTITY_FIELDS, f"{out} holds features prepared differently ({{diff}}); use another output_dir"
        )
        if existing.get("complete"):
            damaged = _damaged(out, existing)
            if not damaged:
                return existing
            if cfg.no_repair:
                raise MissingFeaturesError(
                    f"{out} is complete but has damaged files {damaged}; rerun prepare with the same config and "
                    "no_repair: false to capture them again (nothing was changed)"
                )
            repaired = sorted(damaged)
            for rel in repaired:
                (out / rel).unlink(missing_ok=True)

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
            if _shard_is_complete(out / rel, repaired):
                continue
            if engine is None:
                engine = open_engine(cfg, target_dir, layer_ids)  # data.prepare.engine: hf or sglang
            chunk = tasks[shard_index * cfg.shard_size : (shard_index + 1) * cfg.shard_size]
            try:
                samples = _capture_chunk(engine, chunk, layer_ids, cfg.batch_size, stats, progress, rel)
                write_shard(out / rel, samples, {"split": split, "target": cfg.target})  # names the shard on ENOSPC
            except BaseException:
                close_engine(engine)  # an SGLang engine stops its server in every outcome
                raise
        manifest["splits"][split] = {
            "shards": shards,
            "num_samples": len(tasks),
            "num_tokens": sum(t.num_tokens for t in tasks),
            "num_supervised": sum(t.num_supervised for t in tasks),
        }
    close_engine(engine)
    manifest["nan_skipped"] = manifest.get("nan_skipped", 0) + stats["nan_skipped"]
    if stats["seconds"]:
        manifest["capture_tokens_per_s"] = round(stats["captured_tokens"] / stats["seconds"], 1)
    manifest["complete"] = True
    if repaired:
        manifest["repaired_shards"] = sorted(set(repaired))
        print(f"repaired shards: {manifest['repaired_shards']}", flush=True)
    write_manifest(out, manifest)
    return manifest


def _damaged(out: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """``{file: problem}`` for the shards and vocab mapping of a complete folder that are unusable (cheap)."""
    rels = [rel for info in manifest.get("splits", {}).values() for rel in info.get("shards", [])]
    damaged = damaged_shards(out, rels)
    vocab = vocab_problem(out / manifest.get("vocab_mapping", VOCAB_FILE))
    if vocab:
        damaged[manifest.get("vocab_mapping", VOCAB_FILE)] = vocab
    return damaged


def _shard_is_complete(path: Path, repaired: list[str]) -> bool:
    """Whether the shard is whole; a corrupt one is deleted (and listed in ``repaired``) to be captured again."""
    if not path.exists():
        return False
    if shard_problem(path) is None:
        return True
    path.unlink()  # half-written or corrupt: capture it again
    repaired.append(f"{path.parent.name}/{path.name}")
    return False


def _capture_chunk(engine, tasks, layer_ids, batch_size, stats, progress, label):
    samples = []
    # Length-sorted batches waste less compute on padding; output order stays the task order.
    order = sorted(range(len(tasks)), key=lambda i: tasks[i].num_tokens)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    with track(len(tasks), f"capture {label}", enabled=progress) as bar:
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
            bar.advance(len(idx))
    for i in range(len(tasks)):
        if i in captured:
            samples.append((tasks[i].task_id, captured[i]))
    return samples

