"""EAGLE3 export writers: the SGLang folder and the self-contained hf folder.

SGLang's ``LlamaForCausalLMEagle3`` reads ``config.json`` (architecture, shapes,
``draft_vocab_size``, ``target_hidden_size``, the aux layer ids, and
``tie_word_embeddings: false``, else it would use the embedding as the head) and
``model.safetensors`` with our parameter names as they are (``fc``, ``midlayer.*``,
``norm``, ``lm_head``, ``d2t``, ``t2d``). The embedding is left out: SGLang takes it from
the target. The hf folder is the SGLang folder plus the token embedding and, in
``config.json``, a format marker, our ``Eagle3Config`` and the essentials of the
FeatureContext; it reloads into ``Eagle3Draft`` bit for bit (``eagle3.loading``).

The SGLang folder is bf16 by default (SGLang's ``--dtype auto`` would turn a float32 draft into
float16), its aux layer ids are in SGLang's capture order (``fc`` blocks permuted to match, see
``algorithms.sglang_layers``) and also at top level, where vLLM's EAGLE3 path reads them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.algorithms.base import LoadedDraft
from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft
from specforge_lightning.algorithms.export_files import CONFIG_FILE, write_folder
from specforge_lightning.algorithms.sglang_layers import (
    SGLANG_DEFAULT_DTYPE,
    capture_order,
    dtype_name,
    permute_blocks,
    target_depth,
)

HF_FORMAT = "specforge_lightning.eagle3"  # the marker an hf export writes into config.json
HF_FORMAT_VERSION = 1
TRAINED_STEPS_KEY = "specforge_ttt_length"  # the TTT unroll the draft was trained with (serve hint)
EMBEDDING = "embed_tokens.weight"
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


def export_sglang(
    draft: Eagle3Draft, out_dir: str | Path, dtype: torch.dtype | None = None, context: Mapping[str, Any] | None = None
) -> Path:
    """Write an SGLang-servable EAGLE3 draft folder (no embedding); ``dtype`` None means bf16.

    ``context`` (the draft's FeatureContext essentials) gives the target's depth, to refuse a
    layer SGLang cannot capture, and the trained TTT length, kept for the serve hint.
    """
    context = dict(context or {})
    c = draft.config
    tensors = export_tensors(draft, dtype or SGLANG_DEFAULT_DTYPE, include_embedding=False)
    config = sglang_config(c, tensors["fc.weight"].dtype)
    if c.aux_layer_ids:
        order = capture_order(c.aux_layer_ids, target_depth(context), "eagle3 draft")
        tensors["fc.weight"] = permute_blocks(tensors["fc.weight"], order)
        ids = [int(c.aux_layer_ids[i]) for i in order]
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": ids}
        config["eagle_aux_hidden_state_layer_ids"] = ids  # vLLM's EAGLE3 path reads the top-level key
    if context.get("ttt_length"):
        config[TRAINED_STEPS_KEY] = int(context["ttt_length"])
    return write_folder(out_dir, config, tensors)


def export_hf(
    draft: Eagle3Draft, out_dir: str | Path, context: dict[str, Any] | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write config.json + model.safetensors (embedding included); ``dtype`` None keeps the training dtype."""
    tensors = export_tensors(draft, dtype, include_embedding=True)
    config = sglang_config(draft.config, tensors["fc.weight"].dtype)
    config.update(
        specforge_format=HF_FORMAT,
        format_version=HF_FORMAT_VERSION,
        algorithm="eagle3",
        draft_config=draft.config.to_dict(),
        feature_context=dict(context or {}),
    )
    return write_folder(out_dir, config, tensors)


def write_sglang(loaded: LoadedDraft, out_dir: Path, dtype: torch.dtype | None) -> Path:
    return export_sglang(loaded.draft, out_dir, dtype, loaded.context)


def write_hf(loaded: LoadedDraft, out_dir: Path, dtype: torch.dtype | None) -> Path:
    return export_hf(loaded.draft, out_dir, loaded.context, dtype)


def sglang_serve_hint(loaded: LoadedDraft, out_dir: Path) -> str:
    """The launch command for the folder just written: its dtype, and no more draft steps than trained."""
    cfg = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    trained = cfg.get(TRAINED_STEPS_KEY)
    steps = int(trained) if trained else 3
    ids = cfg.get("eagle_aux_hidden_state_layer_ids")
    layers = f"aux layers {ids} (output of target layer i; config order = SGLang's capture order)" if ids else (
        "aux layers: SGLang's default [1, N//2-1, N-4]"
    )
    note = f"trained TTT {trained}" if trained else "trained TTT length unknown: keep steps <= the fit's ttt_length"
    return (
        "serve: python -m sglang.launch_server --model-path <target> --speculative-algorithm EAGLE3 "
        f"--speculative-draft-model-path {out_dir} --speculative-num-steps {steps} --speculative-eagle-topk 1 "
        f"--speculative-num-draft-tokens {steps + 1} --dtype {cfg.get('torch_dtype', 'bfloat16')}  # {note}; {layers}"
    )


__all__ = [
    "EMBEDDING",
    "HF_FORMAT",
    "HF_FORMAT_VERSION",
    "REQUIRED_TENSORS",
    "TRAINED_STEPS_KEY",
    "export_hf",
    "export_sglang",
    "export_tensors",
    "sglang_config",
    "sglang_serve_hint",
    "write_hf",
    "write_sglang",
]
