"""Read a trained EAGLE3 draft back: from a Lightning checkpoint or from an exported folder (hf or SGLang).

A checkpoint (written by the Trainer with ``Eagle3Module``) stores the draft's weights
under ``draft.*`` and, under the ``eagle3`` key, the draft config and the FeatureContext
it was trained on. The frozen embedding is never stored there; it is read from the
target folder when asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from specforge_lightning.algorithms.base import DraftLoadError, LoadedDraft, LoadOptions
from specforge_lightning.algorithms.eagle3.export import EMBEDDING, HF_FORMAT, HF_FORMAT_VERSION, TRAINED_STEPS_KEY
from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft
from specforge_lightning.algorithms.export_files import context_essentials, read_weights
from specforge_lightning.algorithms.target_weights import load_target_tensors

NAME = "eagle3"
DRAFT_PREFIX = "draft."
SGLANG_ARCHITECTURES = ["LlamaForCausalLMEagle3"]
D = TypeVar("D", bound=torch.nn.Module)


def _loaded(draft: Eagle3Draft, source: str, kind: str, context: Mapping[str, Any]) -> LoadedDraft:
    c = draft.config
    return LoadedDraft(
        algorithm=NAME,
        draft=draft,
        source=source,
        kind=kind,
        layer_ids=tuple(c.aux_layer_ids),
        target_hidden_size=c.target_hidden_size,
        vocab_size=c.vocab_size,
        draft_vocab_size=c.draft_vocab_size,
        context=dict(context),
    )


def _build(config: Eagle3Config, state: Mapping[str, torch.Tensor], source: str) -> Eagle3Draft:
    return load_stored_state(Eagle3Draft(config), state, source)


def load_stored_state(draft: D, state: Mapping[str, torch.Tensor], source: str) -> D:
    """``draft`` holding exactly the stored ``state`` (its dtypes kept), frozen for drafting.

    A missing or unexpected weight, or a wrong shape, is a DraftLoadError naming ``source``.
    """
    expected = set(draft.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise DraftLoadError(
            f"{source}: draft weights do not fit the stored config "
            f"(missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]})"
        )
    try:
        draft.load_state_dict(dict(state), strict=True, assign=True)  # assign keeps the stored dtype
    except RuntimeError as e:
        raise DraftLoadError(f"{source}: draft weights do not fit the stored config ({e})") from e
    return draft.eval().requires_grad_(False)


def attach_embedding(loaded: LoadedDraft, target_dir: str | Path) -> None:
    """Load the frozen token embedding from the target's safetensors into the draft."""
    folder = Path(str(target_dir)) if target_dir else None
    if folder is None or not folder.is_dir():
        raise DraftLoadError(
            f"{loaded.source}: the draft's embedding comes from its target folder {str(target_dir)!r}, "
            "which does not exist here; pass the target folder explicitly"
        )
    tensors = load_target_tensors(folder, ["model.embed_tokens.weight"])
    emb = tensors.get("model.embed_tokens.weight")
    config = loaded.draft.config
    want = (config.vocab_size, config.hidden_size)
    if emb is None or tuple(emb.shape) != want:
        got = None if emb is None else tuple(emb.shape)
        raise DraftLoadError(f"{loaded.source}: target {folder} has embedding shape {got}, the draft needs {want}")
    loaded.draft.embed_tokens.weight = emb.to(loaded.draft.fc.weight.dtype)
    loaded.has_embedding = True


def load_checkpoint(path: Path, ckpt: Mapping[str, Any], options: LoadOptions) -> LoadedDraft:
    """Rebuild the draft stored in an ``Eagle3Module`` checkpoint, in its stored dtype."""
    meta = ckpt.get(NAME)
    if not isinstance(meta, Mapping) or "draft_config" not in meta:
        raise DraftLoadError(f"{path}: not an EAGLE3 checkpoint (no {NAME!r} entry with a draft config)")
    try:
        config = Eagle3Config.from_dict(meta["draft_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise DraftLoadError(f"{path}: the stored EAGLE3 draft config is invalid ({e})") from e
    state = {k[len(DRAFT_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(DRAFT_PREFIX)}
    context = dict(meta.get("feature_context") or {})
    kept = context_essentials(context)
    if options.target_dir:  # the folder the user points at is the one exports check layer ids against
        kept["target_dir"] = str(options.target_dir)
    ttt = (ckpt.get("hyper_parameters") or {}).get("ttt_length")
    if ttt:
        kept["ttt_length"] = int(ttt)  # the serve hint drafts no more steps than were trained
    loaded = _loaded(_build(config, state, str(path)), str(path), "checkpoint", kept)
    if options.with_embedding:
        attach_embedding(loaded, options.target_dir or context.get("target_dir", ""))
    return loaded


def owns_export(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("specforge_format") == HF_FORMAT or cfg.get("architectures") == SGLANG_ARCHITECTURES


def config_from_sglang(cfg: Mapping[str, Any], target_dir: str | None = None) -> Eagle3Config:
    """An ``Eagle3Config`` from an SGLang ``LlamaForCausalLMEagle3`` config.json.

    A folder without ``eagle_config`` drafts from SGLang's default layers, which are ours too
    (``[1, N//2-1, N-4]``); reading them needs the target's depth, from ``target_dir``.
    """
    d = dict(cfg)
    rope = d.get("rope_parameters") or {}
    d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if "rope_scaling" not in d and rope and rope.get("rope_type", "default") != "default":
        d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    d.setdefault("rope_scaling", None)
    d.setdefault("draft_vocab_size", d["vocab_size"])
    d.setdefault("target_hidden_size", d["hidden_size"])
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    d.setdefault("num_key_value_heads", d["num_attention_heads"])
    d.setdefault("rms_norm_eps", 1e-6)
    d.setdefault("max_position_embeddings", 4096)
    d["aux_layer_ids"] = tuple((d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or ())
    if not d["aux_layer_ids"] and target_dir and (Path(target_dir) / "config.json").is_file():
        depth = int(json.loads((Path(target_dir) / "config.json").read_text())["num_hidden_layers"])
        d["aux_layer_ids"] = (1, depth // 2 - 1, depth - 4)
    try:
        return Eagle3Config.from_dict(d)
    except (TypeError, ValueError) as e:
        raise DraftLoadError(f"SGLang config cannot describe an EAGLE3 draft: {e}") from e


def load_export(folder: Path, cfg: Mapping[str, Any], options: LoadOptions) -> LoadedDraft:
    """An ``hf`` export (self-contained) or an ``sglang`` export (embedding from the target folder)."""
    if cfg.get("specforge_format") == HF_FORMAT:
        version = cfg.get("format_version")
        if version != HF_FORMAT_VERSION:
            raise DraftLoadError(f"{folder}: export format version {version}, this code reads {HF_FORMAT_VERSION}")
        config, context, kind = Eagle3Config.from_dict(cfg["draft_config"]), dict(cfg.get("feature_context", {})), "hf"
    else:
        config, context, kind = config_from_sglang(cfg, options.target_dir), {}, "sglang"
        if cfg.get(TRAINED_STEPS_KEY):
            context["ttt_length"] = int(cfg[TRAINED_STEPS_KEY])
        if options.target_dir:
            context["target_dir"] = str(options.target_dir)
    tensors = read_weights(folder)
    emb = tensors.pop(EMBEDDING, None)
    if "t2d" not in tensors and "d2t" in tensors:  # SGLang ignores t2d; third-party folders may omit it
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[tensors["d2t"] + torch.arange(config.draft_vocab_size)] = True
        tensors["t2d"] = t2d
    loaded = _loaded(_build(config, tensors, str(folder)), str(folder), kind, context)
    if emb is not None:
        if tuple(emb.shape) != (config.vocab_size, config.hidden_size):
            raise DraftLoadError(f"{folder}: embedding shape {tuple(emb.shape)} does not fit the config")
        loaded.draft.embed_tokens.weight = emb
        loaded.has_embedding = True
    elif options.with_embedding and (options.target_dir or context.get("target_dir")):
        attach_embedding(loaded, options.target_dir or context["target_dir"])
    return loaded


__all__ = ["attach_embedding", "config_from_sglang", "load_checkpoint", "load_export", "owns_export"]
