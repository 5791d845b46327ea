"""EAGLE3: a one-layer draft on the target's captured hidden states, trained with TTT."""

from specforge_lightning.algorithms.base import Algorithm, DrafterOptions, ExportFormat, LoadedDraft
from specforge_lightning.algorithms.eagle3 import loading
from specforge_lightning.algorithms.eagle3.drafter import Eagle3Drafter
from specforge_lightning.algorithms.eagle3.export import sglang_serve_hint, write_hf, write_sglang
from specforge_lightning.algorithms.eagle3.loss import (
    Eagle3LossOutput,
    Eagle3Teacher,
    compute_teacher,
    eagle3_loss,
    effective_loss_mask,
)
from specforge_lightning.algorithms.eagle3.model import Eagle3Cache, Eagle3Config, Eagle3Draft
from specforge_lightning.algorithms.eagle3.module import Eagle3Module


def _drafter(loaded: LoadedDraft, options: DrafterOptions = DrafterOptions()) -> Eagle3Drafter:
    options.refuse_unsupported("eagle3")
    return Eagle3Drafter(loaded.draft)


ALGORITHM = Algorithm(
    name="eagle3",
    module=Eagle3Module,
    load_checkpoint=loading.load_checkpoint,
    owns_export=loading.owns_export,
    load_export=loading.load_export,
    exports={
        "sglang": ExportFormat(
            write=write_sglang, serve_hint=sglang_serve_hint, description="servable by SGLang, no embedding"
        ),
        "hf": ExportFormat(write=write_hf, needs_embedding=True, description="self-contained, reloads bit for bit"),
    },
    make_drafter=_drafter,
    tree_drafting=True,
)

__all__ = [
    "ALGORITHM",
    "Eagle3Cache",
    "Eagle3Config",
    "Eagle3Draft",
    "Eagle3Drafter",
    "Eagle3LossOutput",
    "Eagle3Module",
    "Eagle3Teacher",
    "compute_teacher",
    "eagle3_loss",
    "effective_loss_mask",
]
