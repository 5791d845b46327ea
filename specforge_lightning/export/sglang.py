"""Export an EAGLE3 draft as a folder SGLang serves with ``--speculative-algorithm EAGLE3``.

SGLang's ``LlamaForCausalLMEagle3`` reads ``config.json`` (architecture, shapes,
``draft_vocab_size``, ``target_hidden_size``, the aux layer ids, and
``tie_word_embeddings: false``, else it would use the embedding as the head) and
``model.safetensors`` with our parameter names as they are (``fc``,
``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``). The embedding is left
out: SGLang takes it from the target.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft
from specforge_lightning.export.loading import EMBEDDING, WEIGHTS_FILE

REQUIRED_TENSORS = (
    "fc.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
)


def sglang_config(config: Eagle3Config, dtype: torch.dtype) -> dict[str, Any]:
    """The draft's SGLang ``config.json``, with RoPE in both the legacy and the Transformers-5 layout."""
    out = config.sglang_config()
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    if "type" in rope and rope["rope_type"] == "default":
        rope["rope_type"] = rope.pop("type")
    out["rope_parameters"] = rope
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out["tie_word_embeddings"] = False  # enforced here too: SGLang would use the embedding as the head
    out["num_hidden_layers"] = 1
    return out


def export_tensors(draft: Eagle3Draft, dtype: torch.dtype | None, include_embedding: bool) -> dict[str, torch.Tensor]:
    """The draft's tensors by SGLang name; floating tensors cast to ``dtype`` (None: keep), ids untouched."""
    tensors = draft.export_state_dict(include_embedding=include_embedding)
    if include_embedding and tensors[EMBEDDING].numel() and not tensors[EMBEDDING].any():
        raise ValueError("the draft's embedding is all zeros (never loaded from the target); cannot export it")
    missing = [n for n in REQUIRED_TENSORS if n not in tensors]
    if missing:
        raise ValueError(f"the draft lacks tensors SGLang needs: {missing}")
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def write_folder(out_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors``, each via a temporary name and a rename."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    weights_tmp = out / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    weights_tmp.chmod(0o666 & ~umask)  # safetensors writes 0600; a served folder is read by other users
    os.replace(weights_tmp, out / WEIGHTS_FILE)
    config_tmp = out / f".config.json.{os.getpid()}.tmp"
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(config_tmp, out / "config.json")
    return out


def export_sglang(draft: Eagle3Draft, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an SGLang-servable EAGLE3 draft folder (no embedding); ``dtype`` None keeps the training dtype."""
    tensors = export_tensors(draft, dtype, include_embedding=False)
    return write_folder(out_dir, sglang_config(draft.config, tensors["fc.weight"].dtype), tensors)


__all__ = ["REQUIRED_TENSORS", "export_sglang", "export_tensors", "sglang_config", "write_folder"]
