"""``python -m specforge_lightning export --ckpt_path X --format sglang|hf --output_dir D``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from specforge_lightning.export.loading import DraftLoadError, load_draft

FORMATS = ("sglang", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specforge_lightning export", description="Export a trained EAGLE3 draft.")
    p.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (.ckpt) or an hf export folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="sglang: servable, no embedding; hf: self-contained")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as trained)")
    p.add_argument("--target_dir", default=None, help="target folder for the embedding (default: the one recorded)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow pickled objects beyond tensors (weights_only=False): only for your own checkpoints")
    return p


def _module_export(ns: argparse.Namespace, dtype: torch.dtype | None) -> str | None:
    """A checkpoint of a registered algorithm whose module has ``export_hf`` (DFlash family) exports itself."""
    from specforge_lightning.algorithms.registry import ALGORITHMS
    from specforge_lightning.export.loading import read_checkpoint

    ckpt = read_checkpoint(ns.ckpt_path, trusted=ns.trust_checkpoint)
    for cls in ALGORITHMS.values():
        if getattr(cls, "checkpoint_key", None) in ckpt and hasattr(cls, "export_hf"):
            module = cls.load_from_checkpoint(ns.ckpt_path, map_location="cpu", weights_only=not ns.trust_checkpoint)
            return str(module.export_hf(ns.output_dir, dtype))
    return None


def main(args: Sequence[str] | None = None) -> None:
    ns = build_parser().parse_args(None if args is None else list(args))
    dtype = DTYPES[ns.dtype] if ns.dtype else None
    if ns.format == "hf" and os.path.isfile(ns.ckpt_path):
        try:
            out = _module_export(ns, dtype)
        except (DraftLoadError, ValueError, FileNotFoundError) as e:
            raise SystemExit(f"export: {e}") from None
        if out is not None:
            print(f"exported {ns.ckpt_path} as hf to {out}")
            return
    from specforge_lightning.export.hf import export_hf
    from specforge_lightning.export.sglang import export_sglang

    try:
        loaded = load_draft(
            ns.ckpt_path, target_dir=ns.target_dir, with_embedding=ns.format == "hf", trusted=ns.trust_checkpoint
        )
        if ns.format == "hf" and not loaded.has_embedding:
            raise DraftLoadError(f"{ns.ckpt_path}: no embedding found; pass --target_dir for an hf export")
        if ns.format == "sglang":
            out = export_sglang(loaded.draft, ns.output_dir, dtype)
        else:
            out = export_hf(loaded.draft, ns.output_dir, loaded.context, dtype)
    except (DraftLoadError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"export: {e}") from None
    c = loaded.config
    print(
        f"exported {loaded.kind} {ns.ckpt_path} as {ns.format} to {out} "
        f"(hidden {c.hidden_size}, draft vocab {c.draft_vocab_size}/{c.vocab_size}, aux layers {list(c.aux_layer_ids)})"
    )
    if ns.format == "sglang":
        print(
            "serve: python -m sglang.launch_server --model-path <target> --speculative-algorithm EAGLE3 "
            f"--speculative-draft-model-path {out} --speculative-num-steps 3 --speculative-eagle-topk 1 "
            "--speculative-num-draft-tokens 4"
        )
