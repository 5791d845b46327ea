"""Reading what a draft copies from its target: layer geometry, config.json, chosen tensors, the vocab mapping."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


def target_geometry(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The layer geometry a draft copies from a HF ``config.json``.

    Reads Transformers 4 ``rope_theta``/``rope_scaling`` and Transformers 5 ``rope_parameters``.
    """
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope:
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        scaling = cfg.get("rope_scaling")
    heads = int(cfg["num_attention_heads"])
    return {
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": dict(scaling) if scaling else None,
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_act": str(cfg.get("hidden_act", "silu")),
    }


class DraftConfigDict:
    """``to_dict``/``from_dict`` for draft-config dataclasses: the checkpoint and export form.

    Tuples become lists (JSON); ``from_dict`` ignores keys the class does not have.
    """

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TargetGeometry(DraftConfigDict):
    """The layer geometry fields every draft config starts with (``target_geometry`` fills them).

    A draft config dataclass derives from this and adds its own fields after these, so the
    field order (positional construction, ``to_dict``) stays geometry first.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    vocab_size: int

    def check_layers(self, hidden_act: str) -> None:
        """Refuse what the draft layers cannot build: a non-SwiGLU MLP, or query heads not grouped over kv heads."""
        if hidden_act != "silu":
            raise ValueError(f"only silu (SwiGLU) drafts are supported, got {hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def read_target_config(target_dir: str | Path) -> dict[str, Any]:
    """The target's ``config.json`` as a dict (multimodal ``text_config`` is merged on top)."""
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def _name_candidates(name: str) -> tuple[str, ...]:
    bare = name.removeprefix("model.")
    return (name, bare, "model." + bare, "model.language_model." + bare, "language_model.model." + bare)


def load_target_tensors(
    target_dir: str | Path, names: Iterable[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read only ``names`` from the target's (possibly sharded) safetensors files.

    Names are looked up with and without the ``model.`` prefix; a name that is
    not found is simply absent from the result (tied heads, for instance).
    """
    wanted = list(dict.fromkeys(names))
    found: dict[str, torch.Tensor] = {}
    files = sorted(Path(target_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in target folder {target_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for name in wanted:
                if name in found:
                    continue
                key = next((c for c in _name_candidates(name) if c in keys), None)
                if key is not None:
                    t = f.get_tensor(key)
                    found[name] = t if dtype is None else t.to(dtype)
    return found


def target_head_name(target_config: Mapping[str, Any]) -> str:
    """Where the target's output head lives: ``lm_head.weight``, or the embedding when tied."""
    return "model.embed_tokens.weight" if target_config.get("tie_word_embeddings", False) else "lm_head.weight"


EMBEDDING = "model.embed_tokens.weight"


def load_frozen_head(
    target_dir: str | Path, target_cfg: Mapping[str, Any], frozen_dtype: str | None, extra: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], str]:
    """The target's embedding and output head (plus ``extra`` tensors) a draft keeps frozen.

    ``frozen_dtype`` (a torch dtype name, None: as in the files) is their storage dtype. Returns the
    tensors and the head's name among them: the embedding when tied, or when an untied config has no
    separate head in the files.
    """
    head_name = target_head_name(target_cfg)
    dtype = getattr(torch, frozen_dtype) if frozen_dtype else None
    tensors = load_target_tensors(target_dir, [EMBEDDING, head_name, *extra], dtype=dtype)
    return tensors, head_name if head_name in tensors else EMBEDDING


def load_vocab_mapping(path: str | Path, vocab_size: int, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``d2t`` int64[Vd] and ``t2d`` bool[V] (``target_id = draft_id + d2t[draft_id]``).

    An empty path is allowed only when the draft vocabulary is the full target vocabulary.
    """
    if not path:
        if draft_vocab_size != vocab_size:
            raise ValueError("a vocab mapping file is required when draft_vocab_size != vocab_size")
        return torch.zeros(vocab_size, dtype=torch.long), torch.ones(vocab_size, dtype=torch.bool)
    try:
        tensors = load_file(str(path))
        d2t, t2d = tensors["d2t"].long(), tensors["t2d"].bool()
    except (SafetensorError, OSError, KeyError) as e:
        raise ValueError(f"vocab mapping {path}: not a d2t/t2d safetensors file ({e}); rerun prepare to rewrite it") from e
    if d2t.numel() != draft_vocab_size or t2d.numel() != vocab_size:
        raise ValueError(f"{path}: mapping sizes ({d2t.numel()}, {t2d.numel()}) != ({draft_vocab_size}, {vocab_size})")
    if not torch.equal(torch.nonzero(t2d).flatten(), d2t + torch.arange(draft_vocab_size)):
        raise ValueError(f"{path}: d2t and t2d disagree (nonzero(t2d) != d2t + arange)")
    return d2t, t2d
