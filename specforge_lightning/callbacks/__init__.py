"""Built-in callbacks: atomic checkpoints with best tracking, exact resume, graceful preemption."""

from specforge_lightning.callbacks.checkpoint import SpecForgeCheckpoint
from specforge_lightning.callbacks.checkpoint_io import (
    CheckpointError,
    SafeCheckpointIO,
    find_best_checkpoint,
    find_last_checkpoint,
    read_checkpoint,
)
from specforge_lightning.callbacks.preemption import GracefulPreemption
from specforge_lightning.callbacks.resume import ResumeMismatchError, ResumeState

__all__ = [
    "CheckpointError",
    "GracefulPreemption",
    "ResumeMismatchError",
    "ResumeState",
    "SafeCheckpointIO",
    "SpecForgeCheckpoint",
    "find_best_checkpoint",
    "find_last_checkpoint",
    "read_checkpoint",
]
