"""DSpark's exports: the DFlash family's self-contained HF folder, and the folder SGLang's DSpark loader reads.

``hf`` is :class:`BlockFamily`'s (``config.json`` with the upstream keys plus the heads'
settings, every tensor including the frozen embedding and head; reloads bit for bit).

``sglang`` is what ``sglang/srt/models/dspark.py`` (``Qwen3DSparkModel``, a DFlash draft
with the ``DSparkDraftMixin``; ``--speculative-algorithm DSPARK``) loads: the DFlash backbone
names (``fc``, ``hidden_norm``, ``layers.*``, ``norm``), ``markov_head.*`` and
``confidence_head.proj.*``, no embedding or head (it takes the target's), and a config with
``dflash_config.{mask_token_id, target_layer_ids}``, ``block_size`` (its γ), ``markov_rank``,
``markov_head_type``, ``enable_confidence_head``, ``confidence_head_with_markov`` and
``num_target_layers`` = the TARGET's depth. Its loader insists on a Markov head (rank > 0) and,
outside its static ragged verify mode, on a trained confidence head; the DFlash family's
``sglang_folder`` adds its own checks (q/k norms, layer order, target depth). The writer
refuses what SGLang would not serve as trained. Its slot
convention (slot k predicts anchor+k+1, every slot trained) is ours. Not yet served here:
SGLang's DSpark path needs a GPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from specforge_lightning.algorithms.base import Algorithm, DrafterOptions, ExportFormat, LoadedDraft
from specforge_lightning.algorithms.dflash.export import BlockFamily
from specforge_lightning.algorithms.dflash.sglang import sglang_folder
from specforge_lightning.algorithms.dspark.drafter import DSparkBlockDrafter
from specforge_lightning.algorithms.dspark.model import DSparkDraft
from specforge_lightning.algorithms.export_files import CONFIG_FILE, write_folder

SGLANG_ARCHITECTURE = "Qwen3DSparkModel"


def write_sglang(loaded: LoadedDraft, out_dir: Path, dtype: torch.dtype | None) -> Path:
    """The DFlash family's SGLang folder (layer order, depth, q/k norms, bf16) with DSpark's architecture and heads."""
    draft: DSparkDraft = loaded.draft  # type: ignore[assignment]
    if draft.markov_head is None:
        raise ValueError("SGLang's DSpark loader needs a Markov head: train with model.init_args.markov_rank > 0 "
                         "(or export --format hf)")
    if draft.confidence_head is None:
        raise ValueError("SGLang's DSpark loader expects trained confidence weights: train with "
                         "model.init_args.enable_confidence_head: true and alpha_conf > 0 (or export --format hf)")
    config, tensors = sglang_folder(draft, loaded.algorithm, dict(loaded.context), dtype)
    config["architectures"] = [SGLANG_ARCHITECTURE]
    return write_folder(out_dir, config, tensors)


def sglang_serve_hint(loaded: LoadedDraft, out_dir: Path) -> str:
    """The launch command: SGLang's γ is num_draft_tokens - 1, the trained block size (every slot drafts)."""
    cfg = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    return (
        "serve: python -m sglang.launch_server --model-path <target> --speculative-algorithm DSPARK "
        f"--speculative-draft-model-path {out_dir} --speculative-num-draft-tokens {cfg['block_size'] + 1} "
        f"--dtype {cfg['torch_dtype']}  # gamma = block size {cfg['block_size']}; target layers "
        f"{cfg['dflash_config']['target_layer_ids']} of {cfg['num_target_layers']}"
    )


@dataclasses.dataclass(frozen=True)
class DSparkFamily(BlockFamily):
    """The DFlash family's glue plus the SGLang export and a drafter with the confidence knobs."""

    def make_drafter(self, loaded: LoadedDraft, options: DrafterOptions = DrafterOptions()) -> DSparkBlockDrafter:
        """The drafter; ``options.confidence_threshold`` None drafts whole blocks (as upstream)."""
        options.refuse_unsupported(self.name, ("confidence_threshold",))
        return DSparkBlockDrafter(loaded.draft, options.confidence_threshold)  # type: ignore[arg-type]

    def algorithm(self) -> Algorithm:
        base = super().algorithm()
        exports = dict(base.exports)
        exports["sglang"] = ExportFormat(
            write=write_sglang, serve_hint=sglang_serve_hint,
            description="servable by SGLang (--speculative-algorithm DSPARK), no embedding or head",
        )
        return dataclasses.replace(base, exports=exports)


__all__ = ["SGLANG_ARCHITECTURE", "DSparkFamily", "sglang_serve_hint", "write_sglang"]
