"""Read any registered algorithm's draft back, from a checkpoint file or an exported folder.

The owner is found through the registry (the checkpoint's metadata, or the folder's
``config.json``); the algorithm's own loader rebuilds the draft. Checkpoints are read with
``weights_only=True`` unless the user trusts the file: a pickle that needs arbitrary code
to load is refused rather than executed.
"""

from __future__ import annotations

from pathlib import Path

from specforge_lightning.algorithms.base import Algorithm, DraftLoadError, LoadedDraft, LoadOptions
from specforge_lightning.algorithms.export_files import read_export_config
from specforge_lightning.algorithms.registry import algorithm_of_checkpoint, algorithm_of_export
from specforge_lightning.callbacks.checkpoint_io import CheckpointError, read_checkpoint


def load_draft(path: str | Path, options: LoadOptions | None = None) -> tuple[Algorithm, LoadedDraft]:
    """``(algorithm, loaded draft)`` for a checkpoint file or an exported folder, whichever ``path`` is."""
    options = options or LoadOptions()
    p = Path(path)
    if p.is_dir():
        cfg = read_export_config(p)
        algorithm = algorithm_of_export(cfg, p)
        return algorithm, algorithm.load_export(p, cfg, options)
    if not p.is_file():
        raise DraftLoadError(f"{p}: no such checkpoint file or exported folder")
    try:
        ckpt = read_checkpoint(p, required=("state_dict",), weights_only=not options.trusted)
    except CheckpointError as e:
        raise DraftLoadError(str(e)) from None
    algorithm = algorithm_of_checkpoint(ckpt, p)
    return algorithm, algorithm.load_checkpoint(p, ckpt, options)


__all__ = ["load_draft"]
