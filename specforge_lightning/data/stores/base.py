"""The FeatureStore contract: tensors in, SampleRefs out, and back again."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from specforge_lightning.contracts import FeatureSpec, SampleRef


Tensors = Mapping[str, torch.Tensor]
"""One sample's named feature tensors, as a store takes them in ``put``."""
Provenance = Mapping[str, Any] | None
"""Where a sample came from (recorded in its ref); None when unknown."""


class FeatureStoreError(RuntimeError):
    """A store refused an operation; the message names the sample and the reason."""


@dataclass(frozen=True)
class Lease:
    """Proof that a caller holds a sample's tensors until ``release``."""

    sample_id: str
    generation: int = 0
    handle: Any = field(default=None, compare=False)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> tuple[FeatureSpec, ...]:
    return tuple(
        FeatureSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in sorted(tensors.items())
    )


def num_tokens_of(tensors: Mapping[str, torch.Tensor]) -> int:
    """Sequence length of one sample: the length of ``input_ids`` (dim 0), or 0 when absent."""
    ids = tensors.get("input_ids")
    if ids is None or ids.dim() == 0:
        return 0
    return int(ids.shape[0])


def make_ref(
    tensors: Mapping[str, torch.Tensor],
    sample_id: str,
    uri: str,
    *,
    strategy: str,
    generation: int,
    provenance: Mapping[str, Any] | None,
) -> SampleRef:
    """The SampleRef every store returns from ``put``: keys, specs and token count read off the tensors."""
    return SampleRef(
        sample_id=sample_id,
        store_uri=uri,
        feature_keys={k: k for k in sorted(tensors)},
        feature_specs=specs_of(tensors),
        strategy=strategy,
        generation=generation,
        num_tokens=num_tokens_of(tensors),
        provenance=dict(provenance or {}),
    )


class FeatureStore(ABC):
    """Holds feature tensors; SampleRefs point into it.

    ``put`` stores one sample and returns its ref; ``get`` returns the tensors
    and a lease; ``release`` ends the lease (a consume-once store frees the
    sample then); ``abort`` drops a sample that will never be consumed.
    """

    def put(
        self,
        tensors: Mapping[str, torch.Tensor],
        sample_id: str,
        *,
        strategy: str = "",
        provenance: Mapping[str, Any] | None = None,
    ) -> SampleRef:
        """Store one sample; the public signature lives here once, each store writes in ``_put``."""
        return self._put(tensors, sample_id, strategy, provenance)

    @abstractmethod
    def _put(self, tensors: Tensors, sample_id: str, strategy: str, provenance: Provenance) -> SampleRef:
        """Write ``tensors`` as ``sample_id`` (``strategy``/``provenance`` go into its ref) and return the ref."""

    @abstractmethod
    def get(self, ref: SampleRef) -> tuple[dict[str, torch.Tensor], Lease]: ...

    @abstractmethod
    def release(self, lease: Lease) -> None: ...

    @abstractmethod
    def abort(self, sample_id: str) -> None: ...

    def health(self) -> dict[str, Any]:
        return {"ok": True}

    def close(self) -> None:
        """Free connections and resources; the store is unusable afterwards."""
