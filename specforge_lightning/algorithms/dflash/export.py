"""The DFlash family's (DFlash, Domino) exports and loaders: self-contained HF-style folders and checkpoints.

The folder holds ``config.json`` (the upstream-style keys: ``block_size``,
``num_target_layers``, ``layer_types``, ``dflash_config`` with the MASK id and
target layer ids, plus our own ``draft_config`` and a format marker) and
``model.safetensors`` with every draft tensor *and* the frozen target
``embed_tokens.weight`` / ``lm_head.weight``, so the draft reloads without the
target folder. ``load_hf`` rebuilds the draft bit for bit.

Each member of the family passes its own module, config and draft classes
(:class:`BlockFamily`), so this base never names a subclass. ``num_target_layers`` is the
target's depth where it is known (read from the target folder); the SGLang folder is
``dflash.sglang``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from specforge_lightning.algorithms.base import Algorithm, DraftLoadError, DrafterOptions, Drafter, ExportFormat, LoadedDraft, LoadOptions
from specforge_lightning.algorithms.dflash.model import DFlashConfig, DFlashDraft
from specforge_lightning.algorithms.dflash.sglang import export_sglang, sglang_serve_hint
from specforge_lightning.algorithms.export_files import context_essentials, read_weights, write_folder
from specforge_lightning.algorithms.sglang_layers import target_depth

FORMAT_PREFIX = "specforge_lightning."
FORMAT_VERSION = 1
FROZEN = ("embed_tokens.weight", "lm_head.weight")
HF_CONTEXT_KEYS = (
    "target_id", "layer_ids", "hidden_size", "vocab_size", "capture_dtype", "max_length", "target_num_layers",
)


def export_hf(
    draft: DFlashDraft, out_dir: str | Path, algorithm: str, context: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (each via a temporary name and a rename)."""
    tensors = {}
    for k, v in draft.export_state_dict(include_frozen=True).items():
        v = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        tensors[k] = v.contiguous().cpu().clone()  # a tied target shares one tensor between embedding and head
    config = draft.config.hf_config()
    context = dict(context or {})
    depth = target_depth(context)
    if depth is not None:
        config["num_target_layers"] = context["target_num_layers"] = depth
    config.update(
        specforge_format=FORMAT_PREFIX + algorithm,
        format_version=FORMAT_VERSION,
        algorithm=algorithm,
        draft_config=draft.config.to_dict(),
        feature_context={k: v for k, v in context.items() if k in HF_CONTEXT_KEYS},
        torch_dtype=str(tensors["fc.weight"].dtype).removeprefix("torch."),
    )
    return write_folder(out_dir, config, tensors)


def load_hf(
    folder: str | Path, cfg: Mapping[str, Any], algorithm: str, config_cls: type[DFlashConfig], draft_cls: type[DFlashDraft]
) -> DFlashDraft:
    """Rebuild a draft written by ``export_hf`` (in eval mode) from its folder and parsed ``config.json``."""
    folder = Path(folder)
    if cfg.get("specforge_format") != FORMAT_PREFIX + algorithm:
        raise DraftLoadError(f"{folder}: not a {algorithm} export (format {cfg.get('specforge_format')!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise DraftLoadError(f"{folder}: export format version {cfg.get('format_version')}, this code reads {FORMAT_VERSION}")
    try:
        draft = draft_cls(config_cls.from_dict(cfg["draft_config"]))
        tensors = read_weights(folder)
        frozen = {k: tensors.pop(k) for k in FROZEN}
        draft.load_state_dict(tensors, strict=True, assign=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise DraftLoadError(f"{folder}: cannot read the {algorithm} export ({e})") from e
    draft.set_target_weights(frozen["embed_tokens.weight"], frozen["lm_head.weight"])
    return draft.eval().requires_grad_(False)


@dataclass(frozen=True)
class BlockFamily:
    """One member of the DFlash family: the classes its generic glue needs."""

    name: str
    module: type[L.LightningModule]
    config_cls: type[DFlashConfig]
    draft_cls: type[DFlashDraft]
    drafter_cls: Callable[[DFlashDraft], Drafter]

    def loaded(self, draft: DFlashDraft, source: str, kind: str, context: Mapping[str, Any]) -> LoadedDraft:
        c = draft.config
        return LoadedDraft(
            algorithm=self.name, draft=draft, source=source, kind=kind, layer_ids=tuple(c.target_layer_ids),
            target_hidden_size=c.hidden_size, vocab_size=c.vocab_size, draft_vocab_size=c.vocab_size,
            context=dict(context), has_embedding=True,
        )

    def load_checkpoint(self, path: Path, ckpt: Mapping[str, Any], options: LoadOptions) -> LoadedDraft:
        """The module rebuilds its draft (frozen target weights from the target folder recorded in the checkpoint)."""
        try:
            module = self.module.load_from_checkpoint(path, map_location="cpu", weights_only=not options.trusted)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise DraftLoadError(f"{path}: cannot rebuild the {self.name} draft ({e})") from e
        draft = module.draft.eval().requires_grad_(False)
        context = context_essentials(asdict(module.context))
        if options.target_dir:  # the folder the user points at is the one exports check layer ids against
            context["target_dir"] = str(options.target_dir)
        return self.loaded(draft, str(path), "checkpoint", context)

    def owns_export(self, cfg: Mapping[str, Any]) -> bool:
        return cfg.get("specforge_format") == FORMAT_PREFIX + self.name

    def load_export(self, folder: Path, cfg: Mapping[str, Any], options: LoadOptions) -> LoadedDraft:
        draft = load_hf(folder, cfg, self.name, self.config_cls, self.draft_cls)
        stored = cfg.get("feature_context") or {}
        context = context_essentials(stored)
        if stored.get("target_num_layers"):
            context["target_num_layers"] = int(stored["target_num_layers"])
        if options.target_dir:
            context["target_dir"] = str(options.target_dir)
        return self.loaded(draft, str(folder), "hf", context)

    def write_hf(self, loaded: LoadedDraft, out_dir: Path, dtype: torch.dtype | None) -> Path:
        return export_hf(loaded.draft, out_dir, self.name, loaded.context, dtype)

    def write_sglang(self, loaded: LoadedDraft, out_dir: Path, dtype: torch.dtype | None) -> Path:
        return export_sglang(loaded.draft, out_dir, self.name, loaded.context, dtype)

    def serve_hint(self, loaded: LoadedDraft, out_dir: Path) -> str:
        return sglang_serve_hint(out_dir)

    def make_drafter(self, loaded: LoadedDraft, options: DrafterOptions = DrafterOptions()) -> Drafter:
        options.refuse_unsupported(self.name)
        return self.drafter_cls(loaded.draft)

    def algorithm(self) -> Algorithm:
        """This member's registry record."""
        return Algorithm(
            name=self.name,
            module=self.module,
            load_checkpoint=self.load_checkpoint,
            owns_export=self.owns_export,
            load_export=self.load_export,
            exports={
                "hf": ExportFormat(write=self.write_hf, description="self-contained folder (frozen embedding and head)"),
                "sglang": ExportFormat(
                    write=self.write_sglang, serve_hint=self.serve_hint,
                    description="servable by SGLang's DFlashDraftModel, bf16, no embedding or head",
                ),
            },
            make_drafter=self.make_drafter,
        )


__all__ = ["BlockFamily", "export_hf", "load_hf"]
