"""Read a trained EAGLE3 draft back: from a Lightning checkpoint or from an exported folder.

A checkpoint (``.ckpt`` written by the Trainer with ``Eagle3Module``) stores the
draft's weights under ``draft.*`` and, under the module's checkpoint key, the
draft config and the FeatureContext it was trained on. The frozen embedding is
never stored there; it is read from the target folder when asked for.

Checkpoints are read with ``torch.load(weights_only=True)``: a pickle that
needs arbitrary code to load is refused rather than executed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from specforge_lightning.algorithms.common import load_target_tensors
from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft
from specforge_lightning.algorithms.eagle3.module import CHECKPOINT_KEY

DRAFT_PREFIX = "draft."
HF_FORMAT = "specforge_lightning.eagle3"  # the marker an hf export writes into config.json
HF_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
EMBEDDING = "embed_tokens.weight"
# The FeatureContext fields an export keeps (target_dir is a hint: it may not exist elsewhere).
CONTEXT_FIELDS = (
    "target_id",
    "target_dir",
    "layer_ids",
    "hidden_size",
    "vocab_size",
    "draft_vocab_size",
    "capture_dtype",
    "max_length",
)
MANIFEST_FIELDS = ("target_weights_hash", "tokenizer_hash", "chat_template_hash", "corpus", "num_samples")


class DraftLoadError(ValueError):
    """A file or folder that is not a loadable EAGLE3 draft; the message names it."""


@dataclass
class LoadedDraft:
    """A draft plus where it came from and what it was trained against."""

    draft: Eagle3Draft
    config: Eagle3Config
    source: str
    kind: str  # "checkpoint", "hf" or "sglang"
    context: dict[str, Any] = field(default_factory=dict)
    has_embedding: bool = False

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "target_id": self.context.get("target_id")}


# --------------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | Path, *, trusted: bool = False) -> dict[str, Any]:
    """The raw checkpoint dict, or a DraftLoadError that names the file.

    ``trusted`` allows pickled objects beyond tensors and plain containers
    (``weights_only=False``): only for checkpoints you wrote yourself.
    """
    path = Path(path)
    if not path.is_file():
        raise DraftLoadError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:  # the unpickler raises many types on foreign bytes (IndexError, UnpicklingError, ...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        hint = ""
        if not trusted and ("weights_only" in str(e) or "Unsupported global" in str(e)):
            hint = "; it holds pickled objects other than tensors: if you wrote it yourself, pass --trust_checkpoint"
        raise DraftLoadError(f"{path}: not a readable Lightning checkpoint ({type(e).__name__}: {first}){hint}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise DraftLoadError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def load_checkpoint(
    path: str | Path, *, with_embedding: bool = True, target_dir: str | None = None, trusted: bool = False
) -> LoadedDraft:
    """Rebuild the draft stored in an ``Eagle3Module`` checkpoint, in its stored dtype.

    ``with_embedding`` reads the frozen embedding from ``target_dir`` (default: the
    target folder recorded in the checkpoint).
    """
    ckpt = read_checkpoint(path, trusted=trusted)
    meta = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(meta, Mapping) or "draft_config" not in meta:
        extra = sorted(k for k in ckpt if k not in _LIGHTNING_KEYS)
        raise DraftLoadError(
            f"{path}: not an EAGLE3 checkpoint (no {CHECKPOINT_KEY!r} entry with a draft config; "
            f"algorithm-specific entries found: {extra or 'none'})"
        )
    try:
        config = Eagle3Config.from_dict(meta["draft_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise DraftLoadError(f"{path}: the stored EAGLE3 draft config is invalid ({e})") from e
    state = {k[len(DRAFT_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(DRAFT_PREFIX)}
    context = dict(meta.get("feature_context") or {})
    draft = _build(config, state, str(path))
    loaded = LoadedDraft(draft, config, str(path), "checkpoint", _essentials(context))
    if with_embedding:
        attach_embedding(loaded, target_dir or context.get("target_dir", ""))
    return loaded


_LIGHTNING_KEYS = {
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "state_dict",
    "loops",
    "callbacks",
    "optimizer_states",
    "lr_schedulers",
    "hparams_name",
    "hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hyper_parameters",
    "MixedPrecision",
}


def _build(config: Eagle3Config, state: Mapping[str, torch.Tensor], source: str) -> Eagle3Draft:
    draft = Eagle3Draft(config)
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


def _essentials(context: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: context[k] for k in CONTEXT_FIELDS if k in context}
    if "layer_ids" in out:
        out["layer_ids"] = list(out["layer_ids"])
    manifest = context.get("manifest") or {}
    kept = {k: manifest[k] for k in MANIFEST_FIELDS if k in manifest}
    if kept:
        out["manifest"] = kept
    return out


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
    want = (loaded.config.vocab_size, loaded.config.hidden_size)
    if emb is None or tuple(emb.shape) != want:
        got = None if emb is None else tuple(emb.shape)
        raise DraftLoadError(f"{loaded.source}: target {folder} has embedding shape {got}, the draft needs {want}")
    loaded.draft.embed_tokens.weight = emb.to(loaded.draft.fc.weight.dtype)
    loaded.has_embedding = True


# --------------------------------------------------------------------------- exported folders


def read_export_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DraftLoadError(f"{folder}: not an exported draft folder (no config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DraftLoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise DraftLoadError(f"{path}: expected a JSON object")
    return cfg


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise DraftLoadError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        return {k.removeprefix("model."): v for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DraftLoadError(f"{path}: not a readable safetensors file ({e})") from e


def load_exported(folder: str | Path, *, target_dir: str | None = None) -> LoadedDraft:
    """Load an ``hf`` export (self-contained) or an ``sglang`` export (embedding from ``target_dir``)."""
    folder = Path(folder)
    cfg = read_export_config(folder)
    if cfg.get("specforge_format") == HF_FORMAT:
        version = cfg.get("format_version")
        if version != HF_FORMAT_VERSION:
            raise DraftLoadError(f"{folder}: export format version {version}, this code reads {HF_FORMAT_VERSION}")
        config, context, kind = Eagle3Config.from_dict(cfg["draft_config"]), dict(cfg.get("feature_context", {})), "hf"
    elif cfg.get("architectures") == ["LlamaForCausalLMEagle3"]:
        config, context, kind = config_from_sglang(cfg), {}, "sglang"
    else:
        raise DraftLoadError(
            f"{folder}: config.json describes neither an EAGLE3 hf export nor an SGLang EAGLE3 draft "
            f"(architectures {cfg.get('architectures')})"
        )
    tensors = _read_weights(folder)
    emb = tensors.pop(EMBEDDING, None)
    if "t2d" not in tensors and "d2t" in tensors:  # SGLang ignores t2d; third-party folders may omit it
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[tensors["d2t"] + torch.arange(config.draft_vocab_size)] = True
        tensors["t2d"] = t2d
    loaded = LoadedDraft(_build(config, tensors, str(folder)), config, str(folder), kind, context)
    if emb is not None:
        if tuple(emb.shape) != (config.vocab_size, config.hidden_size):
            raise DraftLoadError(f"{folder}: embedding shape {tuple(emb.shape)} does not fit the config")
        loaded.draft.embed_tokens.weight = emb
        loaded.has_embedding = True
    elif target_dir or context.get("target_dir"):
        attach_embedding(loaded, target_dir or context["target_dir"])
    return loaded


def config_from_sglang(cfg: Mapping[str, Any]) -> Eagle3Config:
    """An ``Eagle3Config`` from an SGLang ``LlamaForCausalLMEagle3`` config.json."""
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
    try:
        return Eagle3Config.from_dict(d)
    except (TypeError, ValueError) as e:
        raise DraftLoadError(f"SGLang config cannot describe an EAGLE3 draft: {e}") from e


def load_draft(
    path: str | Path, *, target_dir: str | None = None, with_embedding: bool = True, trusted: bool = False
) -> LoadedDraft:
    """A checkpoint file or an exported folder, whichever ``path`` is."""
    p = Path(path)
    if p.is_dir():
        return load_exported(p, target_dir=target_dir)
    return load_checkpoint(p, with_embedding=with_embedding, target_dir=target_dir, trusted=trusted)


def load_module_draft(path: str | Path, *, trusted: bool = False) -> LoadedDraft | None:
    """A draft of a registered algorithm whose module reads it back itself (``load_export``: DFlash family).

    A checkpoint is rebuilt with the module's ``load_from_checkpoint`` (its frozen
    target weights come from the target folder recorded there); an exported folder
    with ``load_export``. ``None`` when ``path`` is not such a draft (EAGLE3: use ``load_draft``).
    """
    from dataclasses import asdict

    from specforge_lightning.algorithms.registry import ALGORITHMS

    p = Path(path)
    if p.is_dir():
        cfg = read_export_config(p)
        cls = ALGORITHMS.get(str(cfg.get("algorithm")))
        if cls is None or not hasattr(cls, "load_export"):
            return None
        try:
            draft, cfg = cls.load_export(p)
        except (ValueError, KeyError, OSError, SafetensorError) as e:
            raise DraftLoadError(f"{p}: cannot read the {cfg.get('algorithm')} export ({e})") from e
        return LoadedDraft(draft, draft.config, str(p), "hf", _essentials(cfg.get("feature_context") or {}), True)
    ckpt = read_checkpoint(p, trusted=trusted)
    for cls in ALGORITHMS.values():
        if getattr(cls, "checkpoint_key", None) in ckpt and hasattr(cls, "load_export"):
            try:
                module = cls.load_from_checkpoint(p, map_location="cpu", weights_only=not trusted)
            except (ValueError, KeyError, OSError, RuntimeError) as e:
                raise DraftLoadError(f"{p}: cannot rebuild the {cls.checkpoint_key} draft ({e})") from e
            draft = module.draft.eval().requires_grad_(False)
            return LoadedDraft(draft, draft.config, str(p), "checkpoint", _essentials(asdict(module.context)), True)
    return None


__all__ = [
    "DraftLoadError",
    "LoadedDraft",
    "attach_embedding",
    "config_from_sglang",
    "load_checkpoint",
    "load_draft",
    "load_exported",
    "load_module_draft",
    "read_checkpoint",
]
