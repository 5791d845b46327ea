"""``python -m specforge_lightning evaluate``: measured acceptance length and speedup of a trained draft.

    python -m specforge_lightning evaluate --ckpt_path runs/.../checkpoints/last.ckpt --output al.json \\
        [--config configs/eagle3.yaml] [--prompts my.jsonl]

The fit config supplies the target, its chat template and the data slice used
for training: by default the ``config.yaml`` the run saved beside its ``checkpoints/``
folder, so overrides given at fit time are honoured; the default prompts are ShareGPT conversations *after* that
slice (first user turn, chat template with generation prompt), so they are
held out from both train and val. ``--ckpt_path`` is a Lightning checkpoint or
an exported folder (hf or sglang).
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.algorithms.base import DraftLoadError, DrafterOptions, LoadOptions
from specforge_lightning.config_files import run_config_of
from specforge_lightning.data.chat import template_hash
from specforge_lightning.errors import UserError
from specforge_lightning.evaluation.decode_linear import use_decode_linears
from specforge_lightning.evaluation.policy import (
    add_policy_arguments,
    check_supported,
    describe,
    needs_tree,
    resolve_policy,
    run_sweep,
    sweep_grid,
)
from specforge_lightning.evaluation.prompts import eos_ids, held_out_prompts, prompt_ids, read_prepare_section, read_prompt_file
from specforge_lightning.evaluation.report import format_summary, write_report
from specforge_lightning.evaluation.sampling import SamplingParams
from specforge_lightning.evaluation.speculative import run_speculative_eval
from specforge_lightning.export.drafts import load_draft
from specforge_lightning.runtime.precision import announce, resolve_precision
from specforge_lightning.target.prepare import PrepareConfig
from specforge_lightning.target.zoo import load_target, resolve_target

DEFAULT_HELD_OUT = 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specforge_lightning evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None,
                   help="the fit config (default: the config.yaml the run saved beside its checkpoints folder)")
    p.add_argument("--ckpt_path", required=True, help="Lightning checkpoint, or an exported draft folder")
    p.add_argument("--output", required=True, help="result JSON; the plot goes next to it as .png")
    p.add_argument("--prompts", default=None, help="JSONL: one {'prompt': str} or {'conversations': [...]} per line")
    p.add_argument("--num_prompts", type=int, default=None,
                   help=f"how many prompts (default: all of --prompts, or {DEFAULT_HELD_OUT} held-out ones)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    add_policy_arguments(p)
    p.add_argument("--dtype", choices=[*sorted(DTYPES), "auto"], default="bfloat16",
                   help="target dtype (auto: bfloat16 where the device has native bf16, else float32)")
    p.add_argument("--draft_dtype", choices=sorted(DTYPES), default=None, help="draft dtype (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--target", default=None, help="override the config's target (name or folder)")
    p.add_argument("--max_prompt_tokens", type=int, default=None,
                   help="skip default prompts longer than this (default: the config's max_length)")
    p.add_argument("--confidence_threshold", type=float, default=None,
                   help="drafters with a confidence head (DSpark): stop a block once its predicted acceptance "
                        "falls below this (default: whole blocks)")
    p.add_argument("--no_warmup", action="store_true", help="do not run a short untimed warm-up decode")
    p.add_argument("--plain_linear", action="store_true",
                   help="on CPU, keep nn.Linear as is (default: float32 layers decode through DecodeLinear)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow pickled objects beyond tensors (weights_only=False): only for your own checkpoints")
    return p


# --------------------------------------------------------------------------- main


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    ns = build_parser().parse_args(None if args is None else list(args))
    if ns.threads:
        torch.set_num_threads(ns.threads)
    spec = resolve_policy(ns)
    try:
        sampling = SamplingParams(ns.temperature, ns.top_p, ns.seed)
    except ValueError as e:
        raise UserError(f"evaluate: --temperature/--top_p: {e}") from None
    saved = run_config_of(ns.ckpt_path)
    if saved is not None and ns.config and Path(ns.config).resolve() != saved.resolve():
        print(f"evaluate: reading data.prepare from {saved}, the config the run used (not {ns.config})")
    ns.config = str(saved) if saved is not None else ns.config
    prep = read_prepare_section(ns.config)
    defaults = PrepareConfig(**prep)
    target_name = ns.target or (defaults.target if ns.config else None)
    if not target_name:
        raise UserError("evaluate: give --config (a fit config) or --target")
    if not ns.config and not ns.prompts:
        raise UserError("evaluate: without --config, give --prompts")
    target_dir = resolve_target(target_name, defaults.cache_dir)
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ns.dtype == "auto":  # the report records the dtype used, never auto
        try:
            choice = resolve_precision("auto", device.type)
        except ValueError as e:
            raise UserError(f"evaluate --dtype auto: {e}; give --dtype float32 or bfloat16") from None
        announce(choice)
        ns.dtype = choice.compute

    try:
        algorithm, loaded = load_draft(ns.ckpt_path, LoadOptions(str(target_dir), True, ns.trust_checkpoint))
    except DraftLoadError as e:
        raise UserError(f"evaluate: {e}") from None
    check_supported(algorithm, spec)
    if not loaded.has_embedding:
        raise UserError(f"evaluate: {ns.ckpt_path}: draft has no embedding and none could be read from {target_dir}")
    model, tokenizer = load_target(target_dir, dtype=DTYPES[ns.dtype])
    cfg = model.config
    if (loaded.vocab_size, loaded.target_hidden_size) != (cfg.vocab_size, cfg.hidden_size):
        raise UserError(
            f"evaluate: draft {ns.ckpt_path} was built for vocab {loaded.vocab_size} / hidden "
            f"{loaded.target_hidden_size}, target {target_dir} has {cfg.vocab_size} / {cfg.hidden_size}"
        )
    draft = loaded.draft
    if ns.draft_dtype:
        for p in draft.parameters():
            p.data = p.data.to(DTYPES[ns.draft_dtype])
    model.to(device)
    draft.to(device)
    decode_linears = 0
    if device.type == "cpu" and not ns.plain_linear:  # the same layers serve target-only and speculative decoding
        decode_linears = use_decode_linears(model) + use_decode_linears(draft)
    drafter = algorithm.make_drafter(loaded, DrafterOptions(confidence_threshold=ns.confidence_threshold))

    if ns.prompts:
        convs = read_prompt_file(ns.prompts)
        if not convs:
            raise UserError(f"{ns.prompts}: the prompts file holds no prompts")
        if ns.num_prompts is not None and ns.num_prompts < len(convs):
            print(f"evaluating the first {ns.num_prompts} of the {len(convs)} prompts in {ns.prompts} (--num_prompts)")
        prompts = [prompt_ids(tokenizer, conv) for conv in convs[: ns.num_prompts]]
        desc = f"file {ns.prompts} (first user turn, chat template + generation prompt)"
    else:
        limit = ns.max_prompt_tokens or defaults.max_length
        prompts, desc = held_out_prompts(prep, tokenizer, ns.num_prompts or DEFAULT_HELD_OUT, limit)

    def evaluate(**policy: Any) -> dict[str, Any]:
        return run_speculative_eval(model, drafter, prompts, max_new_tokens=ns.max_new_tokens,
                                    eos_ids=eos_ids(tokenizer, model), warmup=not ns.no_warmup, **policy)

    result = evaluate(num_draft_tokens=spec.num_steps, tree=spec if needs_tree(spec) else None, sampling=sampling)
    if ns.sweep:
        result["sweep"] = run_sweep(evaluate, sweep_grid(spec, algorithm.tree_drafting), sampling)
    result["settings"] = {
        "k": spec.num_steps if spec.topk == 1 else None,
        "num_steps": spec.num_steps,
        "topk": spec.topk,
        "num_draft_tokens": spec.num_draft_tokens,
        "draft_threshold": spec.threshold,
        "drafting": describe(spec, drafter),
        "confidence_threshold": ns.confidence_threshold,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "sweep": ns.sweep,
        "max_new_tokens": ns.max_new_tokens,
        "prompts": desc,
        "num_prompts": len(prompts),
        "target": str(target_name),
        "target_dir": str(target_dir),
        "chat_template_hash": template_hash(tokenizer),
        "dtype": ns.dtype,
        "draft_dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "decode_linear_layers": decode_linears,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    result["draft"] = loaded.describe()
    json_path, png_path = write_report(result, ns.output)
    print(format_summary(result))
    print(f"wrote {json_path} and {png_path}")
    return result
