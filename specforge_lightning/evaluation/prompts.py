"""The prompts ``evaluate`` decodes: held-out corpus conversations after the training slice, or a user's file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from specforge_lightning.config_files import check_fields, load_yaml, section
from specforge_lightning.data.chat import end_of_turn_id
from specforge_lightning.data.corpus import CHAT_ROLES, SHAREGPT_ROLES, load_conversations
from specforge_lightning.data.manifest import read_manifest
from specforge_lightning.errors import UserError
from specforge_lightning.target.prepare import PrepareConfig


# --------------------------------------------------------------------------- the fit config


def read_prepare_section(config_path: str | None) -> dict[str, Any]:
    """``data.init_args.prepare`` (or ``data.prepare``) of a fit config, as PrepareConfig fields."""
    if not config_path:
        return {}
    config = load_yaml(config_path)
    section(config, "data", source=config_path, required=True)
    prep = section(config, "data.prepare", source=config_path)
    check_fields(prep, [f.name for f in fields(PrepareConfig)], where=f"data.prepare of {config_path}")
    return prep


def held_out_skip(prep: Mapping[str, Any]) -> int:
    """First conversation index that training could not have read.

    ``prepare`` records in its manifest where it stopped reading the corpus
    (``corpus_end``: it skips conversations it cannot use, so that is more than
    the sample count); everything from there on is held out.
    """
    cfg = PrepareConfig(**prep)
    manifest = read_manifest(cfg.output_dir)
    if manifest is None or "corpus_end" not in manifest:
        raise UserError(
            f"held-out prompts start where prepare stopped reading the corpus, but {cfg.output_dir} "
            "has no manifest with corpus_end; run fit/prepare first or pass --prompts"
        )
    return int(manifest["corpus_end"])


# --------------------------------------------------------------------------- prompts


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return [int(t) for t in out]


def first_user_turn(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Messages up to and including the first user message (a leading system message is kept)."""
    out = []
    for m in messages:
        out.append({"role": m["role"], "content": m["content"]})
        if m["role"] == "user":
            return out
    raise ValueError("conversation has no user message")


def _normalize(conv: Sequence[Any], where: str) -> list[dict[str, str]]:
    msgs = []
    for m in conv:
        if not isinstance(m, Mapping):
            raise ValueError(f"{where}: a conversation entry is not an object")
        if "role" in m:
            role, content = CHAT_ROLES.get(str(m["role"])), m.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(str(m.get("from"))), m.get("value")
        if role is None or not isinstance(content, str):
            raise ValueError(f"{where}: entries need role/content (or ShareGPT from/value), got {dict(m)}")
        msgs.append({"role": role, "content": content})
    return msgs


def read_prompt_file(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations (cut after the first user turn) from a JSONL of ``prompt`` or ``conversations`` objects."""
    convs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from e
        if isinstance(obj, Mapping) and isinstance(obj.get("prompt"), str):
            convs.append([{"role": "user", "content": obj["prompt"]}])
        elif isinstance(obj, Mapping) and isinstance(obj.get("conversations"), list):
            convs.append(first_user_turn(_normalize(obj["conversations"], where)))
        else:
            raise ValueError(f"{where}: expected an object with a 'prompt' string or a 'conversations' list")
    return convs


def held_out_prompts(
    prep: Mapping[str, Any], tokenizer: Any, num: int, max_prompt_tokens: int
) -> tuple[list[list[int]], str]:
    """The first ``num`` held-out corpus conversations whose prompt fits ``max_prompt_tokens``."""
    corpus = prep.get("corpus", "sharegpt")
    skip = held_out_skip(prep)
    convs = load_conversations(corpus, limit=num * 20 + 100, skip=skip)
    prompts, used = [], 0
    for conv in convs:
        if len(prompts) == num:
            break
        used += 1
        ids = prompt_ids(tokenizer, first_user_turn(conv))
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
    if not prompts:
        raise UserError(f"no held-out {corpus} prompt of at most {max_prompt_tokens} tokens")
    desc = (
        f"{corpus} held-out conversations from index {skip} ({used} read, {len(prompts)} kept with "
        f"<= {max_prompt_tokens} prompt tokens), first user turn, chat template + generation prompt"
    )
    return prompts, desc


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= {int(i) for i in (gen if isinstance(gen, (list, tuple)) else [gen]) if i is not None}
    try:
        ids.add(end_of_turn_id(tokenizer))
    except ValueError:
        pass
    return ids
