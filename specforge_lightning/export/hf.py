"""Export an EAGLE3 draft as a self-contained folder that reloads into ``Eagle3Draft`` bit for bit.

The folder is the SGLang folder plus the token embedding and, in ``config.json``,
a format marker, our ``Eagle3Config`` and the essentials of the FeatureContext
the draft was trained on (target id, layer ids, vocab sizes, hashes). Read it
back with ``specforge_lightning.export.loading.load_exported``; SGLang can serve
it as well (it ignores the extra keys and takes the embedding it finds).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.algorithms.eagle3.model import Eagle3Draft
from specforge_lightning.export.loading import HF_FORMAT, HF_FORMAT_VERSION
from specforge_lightning.export.sglang import export_tensors, sglang_config, write_folder


def export_hf(
    draft: Eagle3Draft, out_dir: str | Path, context: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None
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


__all__ = ["export_hf"]
