"""P-EAGLE: a parallel multi-depth draft on the target's captured hidden states (k tokens per draft forward)."""

from specforge_lightning.algorithms.base import Algorithm, DrafterOptions, ExportFormat, LoadedDraft
from specforge_lightning.algorithms.peagle import export
from specforge_lightning.algorithms.peagle.drafter import PEagleDrafter
from specforge_lightning.algorithms.peagle.loss import PEagleLossOutput, peagle_loss
from specforge_lightning.algorithms.peagle.model import PEagleConfig, PEagleDraft
from specforge_lightning.algorithms.peagle.module import PEagleModule
from specforge_lightning.algorithms.peagle.sampling import Elements, cod_sample, sample_elements


def _drafter(loaded: LoadedDraft, options: DrafterOptions = DrafterOptions()) -> PEagleDrafter:
    options.refuse_unsupported("peagle")
    return PEagleDrafter(loaded.draft)


ALGORITHM = Algorithm(
    name="peagle",
    module=PEagleModule,
    load_checkpoint=export.load_checkpoint,
    owns_export=export.owns_export,
    load_export=export.load_export,
    exports={
        "hf": ExportFormat(write=export.write_hf, description="self-contained (trained embedding, mask_hidden); SGLang serves no P-EAGLE"),
    },
    make_drafter=_drafter,
)

__all__ = [
    "ALGORITHM",
    "Elements",
    "PEagleConfig",
    "PEagleDraft",
    "PEagleDrafter",
    "PEagleLossOutput",
    "PEagleModule",
    "cod_sample",
    "peagle_loss",
    "sample_elements",
]
