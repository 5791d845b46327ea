"""``python -m specforge_lightning export --ckpt_path X --format sglang|hf --output_dir D``.

Any registered algorithm: the checkpoint (or exported folder) names its owner, whose export
writers know the format. Which formats an algorithm writes is its ``Algorithm.exports``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from specforge_lightning.algorithms.base import DraftLoadError, LoadOptions
from specforge_lightning.algorithms.registry import ALGORITHMS
from specforge_lightning.errors import UserError
from specforge_lightning.export.drafts import load_draft

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def known_formats() -> list[str]:
    return sorted({fmt for algorithm in ALGORITHMS.values() for fmt in algorithm.exports})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specforge_lightning export", description="Export a trained draft.")
    p.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (.ckpt) or an exported folder")
    p.add_argument("--format", required=True, choices=known_formats(), help="sglang: servable; hf: self-contained")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as trained)")
    p.add_argument("--target_dir", default=None, help="target folder for the embedding (default: the one recorded)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow pickled objects beyond tensors (weights_only=False): only for your own checkpoints")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    return p


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds something (an earlier export, say) unless the user said so."""
    if out.exists() and not out.is_dir():
        raise UserError(f"export: --output_dir {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise UserError(f"export: {out} is not empty (it holds {shown}); pick an empty folder or pass --overwrite")


def main(args: Sequence[str] | None = None) -> None:
    ns = build_parser().parse_args(None if args is None else list(args))
    dtype = DTYPES[ns.dtype] if ns.dtype else None
    check_output_dir(Path(ns.output_dir), ns.overwrite)  # before anything is read or written
    options = LoadOptions(target_dir=ns.target_dir, with_embedding=False, trusted=ns.trust_checkpoint)
    try:
        algorithm, loaded = load_draft(ns.ckpt_path, options)
        fmt = algorithm.exports.get(ns.format)
        if fmt is None:
            raise DraftLoadError(
                f"{ns.ckpt_path}: {algorithm.name} exports as {sorted(algorithm.exports)}, not {ns.format!r}"
            )
        if fmt.needs_embedding and not loaded.has_embedding:
            algorithm, loaded = load_draft(ns.ckpt_path, LoadOptions(ns.target_dir, True, ns.trust_checkpoint))
            if not loaded.has_embedding:
                raise DraftLoadError(f"{ns.ckpt_path}: no embedding found; pass --target_dir for an {ns.format} export")
        out = fmt.write(loaded, Path(ns.output_dir), dtype)
    except (DraftLoadError, ValueError, FileNotFoundError) as e:
        raise UserError(f"export: {e}") from None
    print(
        f"exported {algorithm.name} {loaded.kind} {ns.ckpt_path} as {ns.format} to {out} "
        f"(target hidden {loaded.target_hidden_size}, draft vocab {loaded.draft_vocab_size}/{loaded.vocab_size}, "
        f"aux layers {list(loaded.layer_ids)})"
    )
    if fmt.serve_hint is not None:
        print(fmt.serve_hint(loaded, out))
