"""PrepareConfig: what decides which features a prepared directory (or a stream) holds.

Its own module so that the feature identity (``target/identity.py``) and the capture
(``target/prepare.py``) both read it without importing each other. Values are checked
when the config is made, so ``--num_samples -5`` fails at once naming the field
instead of reading the whole corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from specforge_lightning.errors import UserError
from specforge_lightning.runtime.config_precision import resolve_capture_dtypes
from specforge_lightning.runtime.precision import announce

# Fields that must be >= the given least value (None values are left to their own rules).
LEAST = {
    "num_samples": 1,
    "num_val_samples": 0,
    "skip_samples": 0,
    "max_length": 2,
    "max_messages": 2,
    "draft_vocab_size": 1,
    "batch_size": 1,
    "shard_size": 1,
    "regenerate_max_new_tokens": 1,
    "regenerate_batch_size": 1,
}


class PrepareConfigError(UserError, ValueError):
    """A PrepareConfig field has a value prepare cannot use; the message names the field."""


@dataclass
class PrepareConfig:
    """Everything that decides which features a prepared directory holds."""

    output_dir: str = "outputs/features/eagle3-smollm2"
    target: str = "smollm2-135m-instruct"
    corpus: str = "sharegpt"
    num_samples: int = 200
    num_val_samples: int = 20
    skip_samples: int = 0
    max_length: int = 256
    max_messages: int | None = None
    train_only_last_turn: bool = False
    # None: the algorithm's preset (StrategySpec.layer_preset); ``eagle3`` or ``spread:<count>``.
    layer_preset: str | None = None
    layer_ids: list[int] | None = None
    draft_vocab_size: int = 8192
    batch_size: int = 8
    shard_size: int = 64
    # ``auto``: decided for the CPU capture runs on (``resolved``); the manifest records the result.
    capture_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    # Re-answer each first user turn with the target's own greedy reply (see target/regenerate.py).
    regenerate: bool = False
    regenerate_max_new_tokens: int = 192
    regenerate_batch_size: int = 16
    # How many train conversations get regenerated answers (None: all). The rest keep the corpus's
    # own answers: they cost ~5x less per token (one capture pass, no generation), and their
    # labels are still the target's own predictions. Validation is always regenerated.
    regenerate_samples: int | None = None
    cache_dir: str | None = None
    # A damaged shard of a complete folder is captured again; true: refuse, naming the damaged shards.
    no_repair: bool = False
    # Who computes the features: ``hf`` (in-process transformers) or ``sglang`` (target/sglang_engine.py).
    # ``sglang_url``: a running capture server (None: launch one with ``sglang_python``, the side venv).
    engine: str = "hf"
    sglang_url: str | None = None
    sglang_python: str = ".venv-sglang/bin/python"

    def __post_init__(self) -> None:
        for name, least in LEAST.items():
            value = getattr(self, name)
            if value is None and name == "max_messages":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise PrepareConfigError(f"data.prepare.{name} must be an integer >= {least}, got {value!r}")
        if self.regenerate_samples is not None and not self.regenerate:
            raise PrepareConfigError("regenerate_samples needs regenerate: true")
        if self.engine not in ("hf", "sglang"):
            raise PrepareConfigError(f"data.prepare.engine must be 'hf' or 'sglang', got {self.engine!r}")
        if self.engine == "sglang" and self.regenerate:
            raise PrepareConfigError("data.prepare.engine=sglang does not regenerate answers; set regenerate: false or engine: hf")
        if self.sglang_url is not None and self.engine != "sglang":
            raise PrepareConfigError("data.prepare.sglang_url needs engine: sglang")
        if self.regenerate_samples is not None and not 0 <= self.regenerate_samples <= self.num_samples:
            raise PrepareConfigError(
                f"regenerate_samples must be between 0 and num_samples ({self.num_samples}), "
                f"got {self.regenerate_samples}"
            )

    def resolved(self) -> PrepareConfig:
        """This config with ``auto`` dtypes decided for this machine (itself when none is ``auto``).

        Why: the capture dtype is part of the features' identity, so prepare, the producer and
        the datamodules' check all compare the resolved name, never ``auto``. The hardware's
        decision is announced once per process.
        """
        try:
            compute, capture, choice = resolve_capture_dtypes(self.compute_dtype, self.capture_dtype)
        except ValueError as e:
            raise PrepareConfigError(f"data.prepare: {e}") from None
        if (compute, capture) == (self.compute_dtype, self.capture_dtype):
            return self
        if choice is not None:
            announce(choice)
        return replace(self, compute_dtype=compute, capture_dtype=capture)
