"""P-EAGLE drafts on disk: the self-contained hf folder, and reading a draft back from it or a checkpoint.

The folder is ``config.json`` (a Llama-style draft config as upstream's ``PEagleDraftModel``
reads it: ``architectures: ["PEagleDraftModel"]``, ``num_hidden_layers``, ``draft_vocab_size``,
``target_hidden_size``, the aux layer ids and the MASK id, plus our format marker,
``draft_config`` and the FeatureContext essentials) and ``model.safetensors`` with every draft
tensor under upstream's names, the trained embedding and ``mask_hidden`` included. SGLang has
no P-EAGLE draft class (only a feature request and an unmerged pull request), so hf is the one
format. A checkpoint holds the whole draft too: reading it back needs no target folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.algorithms.base import DraftLoadError, LoadedDraft, LoadOptions
from specforge_lightning.algorithms.eagle3.loading import load_stored_state
from specforge_lightning.algorithms.export_files import context_essentials, read_weights, write_folder
from specforge_lightning.algorithms.peagle.model import PEagleConfig, PEagleDraft

NAME = "peagle"
HF_FORMAT = "specforge_lightning.peagle"
HF_FORMAT_VERSION = 1
ARCHITECTURES = ["PEagleDraftModel"]
DRAFT_PREFIX = "draft."


def hf_config(config: PEagleConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Upstream-style draft ``config.json`` keys (Llama geometry, draft vocabulary, aux layers, MASK id)."""
    c = config
    rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    return {
        "architectures": ARCHITECTURES, "model_type": "llama", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "num_hidden_layers": c.num_hidden_layers,
        "hidden_act": c.hidden_act, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling, "rope_parameters": rope, "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size, "target_hidden_size": c.target_hidden_size,
        "mask_token_id": c.mask_token_id, "num_depths": c.num_depths, "tie_word_embeddings": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids)},
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(
    draft: PEagleDraft, out_dir: str | Path, context: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write the folder; ``dtype`` casts the floating tensors (None keeps the training dtype), ids untouched."""
    tensors = {}
    for name, t in draft.export_state_dict().items():
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        tensors[name] = t.detach().cpu().contiguous()
    config = hf_config(draft.config, tensors["fc.weight"].dtype)
    config.update(
        specforge_format=HF_FORMAT, format_version=HF_FORMAT_VERSION, algorithm=NAME,
        draft_config=draft.config.to_dict(), feature_context=dict(context or {}),
    )
    return write_folder(out_dir, config, tensors)


def _loaded(draft: PEagleDraft, source: str, kind: str, context: Mapping[str, Any]) -> LoadedDraft:
    c = draft.config
    return LoadedDraft(
        algorithm=NAME, draft=draft, source=source, kind=kind, layer_ids=tuple(c.aux_layer_ids),
        target_hidden_size=c.target_hidden_size, vocab_size=c.vocab_size, draft_vocab_size=c.draft_vocab_size,
        context=dict(context), has_embedding=True,
    )


def _build(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str) -> PEagleDraft:
    try:
        draft = PEagleDraft(PEagleConfig.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise DraftLoadError(f"{source}: the stored P-EAGLE draft config is invalid ({e})") from e
    return load_stored_state(draft, state, source)


def load_checkpoint(path: Path, ckpt: Mapping[str, Any], options: LoadOptions) -> LoadedDraft:
    """The draft of a ``PEagleModule`` checkpoint, in its stored dtype (embedding included)."""
    meta = ckpt.get(NAME)
    if not isinstance(meta, Mapping) or "draft_config" not in meta:
        raise DraftLoadError(f"{path}: not a P-EAGLE checkpoint (no {NAME!r} entry with a draft config)")
    state = {k[len(DRAFT_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(DRAFT_PREFIX)}
    context = context_essentials(dict(meta.get("feature_context") or {}))
    return _loaded(_build(meta["draft_config"], state, str(path)), str(path), "checkpoint", context)


def owns_export(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("specforge_format") == HF_FORMAT


def load_export(folder: Path, cfg: Mapping[str, Any], options: LoadOptions) -> LoadedDraft:
    """An hf folder written by ``export_hf``, bit for bit."""
    if cfg.get("format_version") != HF_FORMAT_VERSION:
        raise DraftLoadError(f"{folder}: export format version {cfg.get('format_version')}, this code reads {HF_FORMAT_VERSION}")
    if "draft_config" not in cfg:
        raise DraftLoadError(f"{folder}: config.json has no draft_config (not written by this exporter)")
    draft = _build(cfg["draft_config"], read_weights(folder), str(folder))
    return _loaded(draft, str(folder), "hf", cfg.get("feature_context") or {})


def write_hf(loaded: LoadedDraft, out_dir: Path, dtype: torch.dtype | None) -> Path:
    return export_hf(loaded.draft, out_dir, loaded.context, dtype)


__all__ = ["HF_FORMAT", "export_hf", "hf_config", "load_checkpoint", "load_export", "owns_export", "write_hf"]
