"""The records that cross the seams of the system.

Standard library only (torch appears under TYPE_CHECKING), so the control plane
can move and validate these records without importing torch. Only
``TrainBatch`` carries tensors; everything else is metadata, and
``assert_no_tensors`` guards that promise wherever a record leaves a process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PromptTask:
    """One unit of work for the target: token ids plus which of them are supervised."""

    task_id: str
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(
                f"PromptTask {self.task_id}: {len(self.input_ids)} input ids but {len(self.loss_mask)} mask entries"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for m in self.loss_mask if m)


@dataclass(frozen=True)
class FeatureSpec:
    """Name, shape and dtype (torch dtype name without the ``torch.`` prefix) of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        return cls(name=str(d["name"]), shape=tuple(int(x) for x in d["shape"]), dtype=str(d["dtype"]))


@dataclass(frozen=True)
class SampleRef:
    """A pointer to one sample's tensors in a FeatureStore. Never holds a tensor.

    ``store_uri`` tells the store where the sample lives (``mem://id``,
    ``shard:///abs/shard.safetensors#id``, ``dir:///abs/root/id``, ``mooncake://id``).
    ``feature_keys`` maps a feature name to the key it is stored under.
    ``generation`` lets a store reject a ref that a newer put has superseded.
    """

    sample_id: str
    store_uri: str
    feature_keys: Mapping[str, str]
    feature_specs: tuple[FeatureSpec, ...] = ()
    strategy: str = ""
    schema_version: int = SCHEMA_VERSION
    generation: int = 0
    num_tokens: int = 0
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def spec(self, name: str) -> FeatureSpec:
        for s in self.feature_specs:
            if s.name == name:
                return s
        raise KeyError(f"sample {self.sample_id} has no feature spec {name!r}")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["feature_specs"] = [s.to_dict() for s in self.feature_specs]
        assert_no_tensors(d)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SampleRef:
        d = json.loads(text)
        d["feature_specs"] = tuple(FeatureSpec.from_dict(s) for s in d.get("feature_specs", ()))
        d["feature_keys"] = dict(d["feature_keys"])
        return cls(**d)


@dataclass
class TrainBatch:
    """The only tensor-carrying record: a collated batch ready for an algorithm."""

    sample_ids: list[str]
    strategy: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def to(self, device: Any) -> TrainBatch:
        return TrainBatch(
            sample_ids=list(self.sample_ids),
            strategy=self.strategy,
            tensors={k: v.to(device) for k, v in self.tensors.items()},
            metadata=dict(self.metadata),
        )


def _is_tensor_like(obj: Any) -> bool:
    cls = type(obj)
    mod = getattr(cls, "__module__", "") or ""
    if mod.startswith("torch") and cls.__name__ in {"Tensor", "Parameter"}:
        return True
    if mod.startswith("numpy") and cls.__name__ == "ndarray":
        return True
    return hasattr(obj, "__dlpack__") or hasattr(obj, "__array_interface__")


def assert_no_tensors(obj: Any, path: str = "record") -> None:
    """Raise TypeError if ``obj`` (a control-plane record) contains a tensor or array anywhere."""
    if _is_tensor_like(obj):
        raise TypeError(f"{path} holds a {type(obj).__name__}; control-plane records carry metadata only")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            assert_no_tensors(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            assert_no_tensors(v, f"{path}[{k!r}]")
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes, bytearray)):
        for i, v in enumerate(obj):
            assert_no_tensors(v, f"{path}[{i}]")
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raise TypeError(f"{path} holds raw bytes; control-plane records carry metadata only")


@dataclass(frozen=True)
class StrategySpec:
    """What an algorithm consumes and how a sample qualifies, declared to the data plane.

    The data plane reads this declaration; it never imports the algorithm.

    Fields:
        name: the algorithm's registry name (also the TrainBatch ``strategy``).
        features: captured tensors every sample must hold.
        optional_features: delivered when the features hold them (e.g. a shortcut the
            algorithm can otherwise compute itself); older feature sets without them still train.
        min_supervised_run: the shortest run of adjacent supervised tokens a sample must
            contain to be useful (1 for EAGLE3, 2 for the DFlash family).
        layer_preset: the target layers ``prepare`` captures when the prepare section names
            none (``eagle3`` or ``spread:<count>``); the datamodules check the features against it.
        layer_count: how many captured layers the draft's input takes (None: any number).
        resume_strict_hparams: module hyperparameters a resume may not change (loss options).
    """

    name: str
    features: tuple[str, ...]
    optional_features: tuple[str, ...] = ()
    min_supervised_run: int = 1
    layer_preset: str = "eagle3"
    layer_count: int | None = None
    resume_strict_hparams: tuple[str, ...] = ()

    def accepts(self, loss_mask: Sequence[int]) -> bool:
        run = best = 0
        for m in loss_mask:
            run = run + 1 if m else 0
            best = max(best, run)
        return best >= self.min_supervised_run


@dataclass(frozen=True)
class FeatureContext:
    """What the data plane tells an algorithm about the features it will receive.

    Built from a prepared feature manifest (offline) or from the producer's
    configuration (online); handed to the LightningModule in ``setup``.
    """

    target_dir: str
    target_id: str
    layer_ids: tuple[int, ...]
    hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    vocab_mapping_path: str = ""
    capture_dtype: str = "bfloat16"
    max_length: int = 0
    manifest: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, e.g. for a checkpoint (rebuilding a draft needs no datamodule)."""
        d = dataclasses.asdict(self)
        d["layer_ids"] = list(self.layer_ids)
        d["manifest"] = dict(self.manifest)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureContext:
        return cls(**{**d, "layer_ids": tuple(d["layer_ids"])})
