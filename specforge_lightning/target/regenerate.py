"""Re-answer prompts with the target itself, so the draft trains on the text it will verify.

A draft is scored on the target's own greedy continuations; training on them
(upstream's "regenerate" step) aligns the contexts the draft sees with the
ones it meets at serving time. Responses are kept as the target's token ids,
never re-tokenized, and end with the end-of-turn token when the target
finished within the budget.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from specforge_lightning.contracts import PromptTask
from specforge_lightning.files import write_text_atomic
from specforge_lightning.runtime.progress import track


def prompt_ids(tokenizer, messages: Sequence[dict], max_prompt_tokens: int) -> list[int] | None:
    """Chat-template ids of the conversation up to its first assistant turn, or None when too long."""
    head = []
    for m in messages:
        if m["role"] == "assistant":
            break
        head.append(m)
    if not head or head[-1]["role"] != "user":
        return None
    ids = tokenizer.apply_chat_template(head, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids) if len(ids) <= max_prompt_tokens else None


@torch.no_grad()
def greedy_responses(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    batch_size: int,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (left-padded batches of similar length)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    with track(len(prompts), "regenerate answers with the target", enabled=progress) as bar:
        for start in range(0, len(order), batch_size):
            _generate_batch(model, prompts, order[start : start + batch_size], out, max_new_tokens, eos_id, pad_id, device)
            bar.advance(min(batch_size, len(order) - start))
    return [o or [] for o in out]


def _generate_batch(model, prompts, idx, out, max_new_tokens, eos_id, pad_id, device) -> None:
    """Greedy-decode one left-padded batch; answers end at (and keep) the first end-of-turn token."""
    width = max(len(prompts[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        p = prompts[i]
        ids[row, width - len(p) :] = torch.tensor(p)
        attn[row, width - len(p) :] = 1
    gen = model.generate(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )[:, width:].cpu()
    for row, i in enumerate(idx):
        tokens = gen[row].tolist()
        if eos_id in tokens:
            tokens = tokens[: tokens.index(eos_id) + 1]
        out[i] = tokens


def regenerate_tasks(
    model,
    tokenizer,
    conversations: Sequence[tuple[str, Sequence[dict]]],
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    cache_file: Path | None = None,
) -> list[PromptTask]:
    """PromptTasks whose supervised part is the target's own greedy answer to each first user turn.

    ``conversations`` are ``(task_id, messages)``. Prompts that leave no room
    for an answer within ``max_length`` are dropped. With ``cache_file`` the
    result is written as JSONL (atomically) and reused when the same task ids
    are asked for again, so a restarted prepare does not generate twice.
    """
    cached = _read_cache(cache_file)
    if cached is not None and [t.task_id for t in cached] == [tid for tid, _ in conversations]:
        return cached
    room = max(1, max_length - 8)
    keep, prompts = [], []
    for task_id, messages in conversations:
        ids = prompt_ids(tokenizer, messages, room)
        if ids is not None:
            keep.append(task_id)
            prompts.append(ids)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answers = greedy_responses(
        model, prompts, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad, batch_size=batch_size
    )
    tasks = []
    for task_id, p, a in zip(keep, prompts, answers):
        ids = (p + a)[:max_length]
        mask = ([0] * len(p) + [1] * len(a))[:max_length]
        tasks.append(PromptTask(task_id, tuple(ids), tuple(mask), {"regenerated": True}))
    if cache_file is not None:
        _write_cache(cache_file, tasks)
    return tasks


def _read_cache(path: Path | None) -> list[PromptTask] | None:
    if path is None or not path.exists():
        return None
    tasks = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            tasks.append(PromptTask(d["task_id"], tuple(d["input_ids"]), tuple(d["loss_mask"]), {"regenerated": True}))
    return tasks


def _write_cache(path: Path, tasks: Sequence[PromptTask]) -> None:
    lines = (
        json.dumps({"task_id": t.task_id, "input_ids": t.input_ids, "loss_mask": t.loss_mask}) + "\n" for t in tasks
    )
    write_text_atomic(path, "".join(lines))
