"""``python -m specforge_lightning evaluate``: measured acceptance length and speedup of a trained draft.

    python -m specforge_lightning evaluate --config configs/eagle3.yaml \\
        --ckpt_path runs/.../last.ckpt --output al.json [--prompts my.jsonl]

The fit config supplies the target, its chat template and the data slice used
for training; the default prompts are ShareGPT conversations *after* that
slice (first user turn, chat template with generation prompt), so they are
held out from both train and val. ``--ckpt_path`` is a Lightning checkpoint or
an exported folder (hf or sglang).
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.data.corpus import CHAT_ROLES, SHAREGPT_ROLES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specforge_lightning evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="the fit config (LightningCLI YAML with data.init_args.prepare)")
    p.add_argument("--ckpt_path", required=True, help="Lightning checkpoint, or an exported draft folder")
    p.add_argument("--output", required=True, help="result JSON; the plot goes next to it as .png")
    p.add_argument("--prompts", default=None, help="JSONL: one {'prompt': str} or {'conversations': [...]} per line")
    p.add_argument("--num_prompts", type=int, default=20)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--k", "--num_draft_tokens", dest="num_draft_tokens", type=int, default=5,
                   help="draft tokens per verify step (chain drafting)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="target dtype")
    p.add_argument("--draft_dtype", choices=sorted(DTYPES), default=None, help="draft dtype (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--target", default=None, help="override the config's target (name or folder)")
    p.add_argument("--max_prompt_tokens", type=int, default=None,
                   help="skip default prompts longer than this (default: the config's max_length)")
    p.add_argument("--no_warmup", action="store_true", help="do not run a short untimed warm-up decode")
    p.add_argument("--plain_linear", action="store_true",
                   help="on CPU, keep nn.Linear as is (default: float32 layers decode through DecodeLinear)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow pickled objects beyond tensors (weights_only=False): only for your own checkpoints")
    return p


# --------------------------------------------------------------------------- the fit config


def read_prepare_section(config_path: str | None) -> dict[str, Any]:
    """``data.init_args.prepare`` (or ``data.prepare``) of a fit config, as PrepareConfig fields."""
    from specforge_lightning.target.prepare import PrepareConfig

    if not config_path:
        return {}
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise SystemExit(f"evaluate: config file not found: {config_path}")
    node = yaml.safe_load(path.read_text()) or {}
    data = node.get("data") if isinstance(node, dict) else None
    if not isinstance(data, dict):
        raise SystemExit(f"evaluate: {config_path} has no 'data' section (expected a fit config)")
    data = data.get("init_args", data)
    prep = dict(data.get("prepare") or {})
    known = {f.name for f in fields(PrepareConfig)}
    unknown = sorted(set(prep) - known)
    if unknown:
        raise SystemExit(f"evaluate: unknown key(s) {unknown} in data.prepare of {config_path}")
    return prep


def held_out_skip(prep: Mapping[str, Any]) -> int:
    """First conversation index that training could not have read.

    ``prepare`` records in its manifest where it stopped reading the corpus
    (``corpus_end``: it skips conversations it cannot use, so that is more than
    the sample count); everything from there on is held out.
    """
    from specforge_lightning.target.prepare import PrepareConfig, read_manifest

    cfg = PrepareConfig(**prep)
    manifest = read_manifest(cfg.output_dir)
    if manifest is None or "corpus_end" not in manifest:
        raise SystemExit(
            f"evaluate: held-out prompts start where prepare stopped reading the corpus, but {cfg.output_dir} "
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
    from specforge_lightning.data.corpus import load_conversations

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
        raise SystemExit(f"evaluate: no held-out {corpus} prompt of at most {max_prompt_tokens} tokens")
    desc = (
        f"{corpus} held-out conversations from index {skip} ({used} read, {len(prompts)} kept with "
        f"<= {max_prompt_tokens} prompt tokens), first user turn, chat template + generation prompt"
    )
    return prompts, desc


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    from specforge_lightning.data.chat import end_of_turn_id

    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= {int(i) for i in (gen if isinstance(gen, (list, tuple)) else [gen]) if i is not None}
    try:
        ids.add(end_of_turn_id(tokenizer))
    except ValueError:
        pass
    return ids


# --------------------------------------------------------------------------- main


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    ns = build_parser().parse_args(None if args is None else list(args))
    from specforge_lightning.data.chat import template_hash
    from specforge_lightning.evaluation.report import format_summary, write_report
    from specforge_lightning.evaluation.speculative import run_speculative_eval
    from specforge_lightning.export.loading import DraftLoadError, load_draft, load_module_draft
    from specforge_lightning.target.prepare import PrepareConfig
    from specforge_lightning.target.zoo import load_target, resolve_target

    if ns.threads:
        torch.set_num_threads(ns.threads)
    prep = read_prepare_section(ns.config)
    defaults = PrepareConfig(**prep)
    target_name = ns.target or (defaults.target if ns.config else None)
    if not target_name:
        raise SystemExit("evaluate: give --config (a fit config) or --target")
    if not ns.config and not ns.prompts:
        raise SystemExit("evaluate: without --config, give --prompts")
    target_dir = resolve_target(target_name, defaults.cache_dir)
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    try:
        loaded = load_module_draft(ns.ckpt_path, trusted=ns.trust_checkpoint) or load_draft(
            ns.ckpt_path, target_dir=str(target_dir), trusted=ns.trust_checkpoint
        )
    except DraftLoadError as e:
        raise SystemExit(f"evaluate: {e}") from None
    if not loaded.has_embedding:
        raise SystemExit(f"evaluate: {ns.ckpt_path}: draft has no embedding and none could be read from {target_dir}")
    model, tokenizer = load_target(target_dir, dtype=DTYPES[ns.dtype])
    cfg = model.config
    c = loaded.config
    if (c.vocab_size, c.target_hidden_size) != (cfg.vocab_size, cfg.hidden_size):
        raise SystemExit(
            f"evaluate: draft {ns.ckpt_path} was built for vocab {c.vocab_size} / hidden {c.target_hidden_size}, "
            f"target {target_dir} has {cfg.vocab_size} / {cfg.hidden_size}"
        )
    if not c.aux_layer_ids:  # an SGLang folder without eagle_config: SGLang's default layers, ours too
        from specforge_lightning.target.layers import eagle3_layer_ids

        c.aux_layer_ids = tuple(eagle3_layer_ids(int(cfg.num_hidden_layers)))
    draft = loaded.draft
    if ns.draft_dtype:
        for p in draft.parameters():
            p.data = p.data.to(DTYPES[ns.draft_dtype])
    model.to(device)
    draft.to(device)
    decode_linears = 0
    if device.type == "cpu" and not ns.plain_linear:  # the same layers serve target-only and speculative decoding
        from specforge_lightning.evaluation.decode_linear import use_decode_linears

        decode_linears = use_decode_linears(model) + use_decode_linears(draft)
    drafter = draft.make_drafter() if hasattr(draft, "make_drafter") else None  # None: EAGLE3 chain drafting

    if ns.prompts:
        prompts = [prompt_ids(tokenizer, conv) for conv in read_prompt_file(ns.prompts)[: ns.num_prompts]]
        desc = f"file {ns.prompts} (first user turn, chat template + generation prompt)"
    else:
        limit = ns.max_prompt_tokens or defaults.max_length
        prompts, desc = held_out_prompts(prep, tokenizer, ns.num_prompts, limit)

    result = run_speculative_eval(
        model,
        draft,
        prompts,
        num_draft_tokens=ns.num_draft_tokens,
        max_new_tokens=ns.max_new_tokens,
        eos_ids=eos_ids(tokenizer, model),
        warmup=not ns.no_warmup,
        drafter=drafter,
    )
    result["settings"] = {
        "num_draft_tokens": ns.num_draft_tokens,
        "drafting": getattr(drafter, "description", "chain (top-1), verify k+1 tokens per target forward"),
        "temperature": 0.0,
        "max_new_tokens": ns.max_new_tokens,
        "prompts": desc,
        "num_prompts": len(prompts),
        "target": str(target_name),
        "target_dir": str(target_dir),
        "chat_template_hash": template_hash(tokenizer),
        "dtype": ns.dtype,
        "draft_dtype": str(draft.fc.weight.dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "decode_linear_layers": decode_linears,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    result["draft"] = {**loaded.describe(), "aux_layer_ids": list(c.aux_layer_ids), "draft_vocab_size": c.draft_vocab_size}
    json_path, png_path = write_report(result, ns.output)
    print(format_summary(result))
    print(f"wrote {json_path} and {png_path}")
    return result
