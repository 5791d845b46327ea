"""EAGLE3's initialisers: composable strategies that start a fresh draft somewhere better than random.

``Eagle3Module(init=[...])`` (YAML: ``model.init_args.init``, a list of ``class_path`` /
``init_args`` items) applies them in list order, to a fresh draft only: resuming from a
checkpoint restores the trained weights and applies nothing. Each initialiser's docstring
holds what it does, its knobs and its measured effect (SmolLM2-135M-Instruct, the
quickstart's 20 held-out prompts; details and commits in docs/results/eagle3-quickstart.md
and docs/experiments/eagle3-smart-init.md). The shipped recipe lists ``TargetHead``,
``TargetNorm``, ``CurrentTokenHead`` and ``CopyHead(previous=0.5)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from lightning.pytorch.utilities import rank_zero_info

from specforge_lightning.algorithms.eagle3.copy_head import plant_copy_head
from specforge_lightning.algorithms.eagle3.model import Eagle3Draft
from specforge_lightning.algorithms.eagle3.self_head import plant_self_head

FIELD = "model.init_args.init"
Tensors = Mapping[str, torch.Tensor]
Samples = Sequence[Mapping[str, torch.Tensor]]


@runtime_checkable
class SampleSource(Protocol):
    """A datamodule that hands out training samples before the first step (offline features)."""

    def sample_features(
        self, num_samples: int, split: str = "train", keys: Sequence[str] | None = None
    ) -> list[dict[str, torch.Tensor]]: ...


class Eagle3Initializer:
    """One initialisation strategy; its constructor arguments are its knobs.

    Two phases, both only for a fresh draft:

    * ``at_build(draft, target_tensors, target_config)``: right after the draft is built and
      its vocab mapping set, with the target's tensors (float32, HF names) that the list's
      ``target_keys(target_config)`` asked for. For copies of target weights.
    * ``at_fit_start(draft, samples, kv_head=, max_length=)``: at ``on_fit_start``, with the
      first ``samples`` training samples (features ``sample_keys`` at least), the key/value
      head ``assign_kv_heads`` gave it (planted heads) and the features' ``max_length``.
      For heads fitted on data. Returns what was fitted.

    Knobs are stored under their own names, so ``spec()`` (the plain ``class_path`` /
    ``init_args`` form kept in checkpoints' hyperparameters), ``repr`` and ``==`` follow them.
    """

    sample_keys: ClassVar[tuple[str, ...]] = ()
    samples: int = 0  # training samples at_fit_start reads (0: none)

    def target_keys(self, target_config: Mapping[str, Any]) -> list[str]:
        """HF names of the target tensors ``at_build`` reads."""
        return []

    def at_build(self, draft: Eagle3Draft, target_tensors: Tensors, target_config: Mapping[str, Any]) -> None:
        return None

    def at_fit_start(
        self, draft: Eagle3Draft, samples: Samples, *, kv_head: int | None, max_length: int
    ) -> dict[str, float]:
        return {}

    def init_args(self) -> dict[str, Any]:
        """The knobs: the constructor's named arguments, read back from the attributes of the same name."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = inspect.signature(type(self).__init__).parameters.values()
        return {p.name: getattr(self, p.name) for p in params if p.kind in kinds and p.name != "self"}

    def spec(self) -> dict[str, Any]:
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    @staticmethod
    def from_spec(spec: Eagle3Initializer | Mapping[str, Any]) -> Eagle3Initializer:
        """An initialiser from its ``spec()`` form (checkpoint hyperparameters); objects pass through.

        Only classes already imported are found (no import by name from a checkpoint).
        """
        if isinstance(spec, Eagle3Initializer):
            return spec
        known = {f"{c.__module__}.{c.__qualname__}": c for c in _subclasses(Eagle3Initializer)}
        path = str(spec.get("class_path", ""))
        cls = known.get(path) or next((c for p, c in known.items() if p.rsplit(".", 1)[-1] == path), None)
        if cls is None:
            raise ValueError(f"{FIELD}: unknown initialiser {path!r}; known: {sorted(known)}")
        return cls(**dict(spec.get("init_args") or {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.init_args().items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.init_args() == self.init_args()

    __hash__ = None  # knobs are mutable


def _subclasses(cls: type) -> list[type]:
    return [s for sub in cls.__subclasses__() for s in (sub, *_subclasses(sub))]


def _copy(draft: Eagle3Draft, tensors: Tensors, cfg: Mapping[str, Any], **part: Any) -> None:
    """One part of ``Eagle3Draft.init_from_target`` (each part writes only its own tensors)."""
    flags = {"lm_head": False, "norm": False, "fc": False, "midlayer": False}
    draft.init_from_target(tensors, cfg, **{**flags, **part})


class TargetHead(Eagle3Initializer):
    """``lm_head`` = the target's output head's rows for the draft vocabulary (the embedding when tied).

    The draft starts predicting what the target's head reads off its hidden state; the planted
    heads write where this head reads. Not measured alone: every measured recipe uses it, with
    ``TargetNorm``.
    """

    def target_keys(self, target_config: Mapping[str, Any]) -> list[str]:
        return ["lm_head.weight", "model.embed_tokens.weight"]

    def at_build(self, draft: Eagle3Draft, target_tensors: Tensors, target_config: Mapping[str, Any]) -> None:
        _copy(draft, target_tensors, target_config, lm_head=True)


class TargetNorm(Eagle3Initializer):
    """The draft's final ``norm`` = the target's final norm (the scale ``TargetHead`` expects)."""

    def target_keys(self, target_config: Mapping[str, Any]) -> list[str]:
        return ["model.norm.weight"]

    def at_build(self, draft: Eagle3Draft, target_tensors: Tensors, target_config: Mapping[str, Any]) -> None:
        _copy(draft, target_tensors, target_config, norm=True)


class TargetFC(Eagle3Initializer):
    """``fc`` = identity on captured layer ``chunk`` (default the last), zeros elsewhere.

    Needs draft hidden == target hidden. Off in the recipes; no measurement recorded.
    """

    def __init__(self, chunk: int = -1) -> None:
        self.chunk = chunk

    def at_build(self, draft: Eagle3Draft, target_tensors: Tensors, target_config: Mapping[str, Any]) -> None:
        _copy(draft, target_tensors, target_config, fc=True, fc_chunk=self.chunk)


class TargetMidlayer(Eagle3Initializer):
    """The decoder layer from target layer ``layer`` (default the last): q/k/v hidden-half columns,
    o_proj, MLP and norms; the embedding-half q/k/v columns are the random ones times
    ``emb_half_scale`` (0: zeros). Off in the recipes; no measurement recorded."""

    def __init__(self, layer: int = -1, emb_half_scale: float = 0.0) -> None:
        self.layer, self.emb_half_scale = layer, emb_half_scale

    def target_keys(self, target_config: Mapping[str, Any]) -> list[str]:
        p = f"model.layers.{self.layer % int(target_config['num_hidden_layers'])}."
        parts = [f"self_attn.{n}_proj.weight" for n in "qkvo"]
        parts += [f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        parts += ["input_layernorm.weight", "post_attention_layernorm.weight"]
        return [p + n for n in parts]

    def at_build(self, draft: Eagle3Draft, target_tensors: Tensors, target_config: Mapping[str, Any]) -> None:
        scale = self.emb_half_scale
        _copy(draft, target_tensors, target_config, midlayer=True, layer=self.layer, emb_half_scale=scale)


class PlantedHead(Eagle3Initializer):
    """An attention head fitted on training samples and written into one key/value head.

    ``kv_head`` None: ``assign_kv_heads`` picks one. ``kv_rank`` orders that choice.
    """

    kv_rank: ClassVar[int] = 0

    def __init__(self, samples: int, kv_head: int | None) -> None:
        if samples < 1:
            raise ValueError(f"{FIELD}: {type(self).__name__} samples must be >= 1, got {samples}")
        if kv_head is not None and kv_head < 0:
            raise ValueError(f"{FIELD}: {type(self).__name__} kv_head must be >= 0 (or null: pick one), got {kv_head}")
        self.samples, self.kv_head = samples, kv_head


def _columns(samples: Samples, keys: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    return {k: [s[k] for s in samples] for k in keys}


class CurrentTokenHead(PlantedHead):
    """Plant a current-token head (``self_head.plant_self_head``): it carries the embedding of the
    token drafted from into the residual stream as a bigram guess, ``strength`` times the size
    of ``fc``'s output.

    Why: that token reaches the residual stream only through attention, and on a CPU budget a
    fresh draft's heads settle on attention sinks. Fitted on the first ``samples`` training
    samples. It reads ``fc``'s output scale, which ``CopyHead`` rewrites: list it before the
    copy head (the recipe does). Measured: 600-step validation AL 1.724 -> 1.812 at strength 8
    (1.803 at 16, 1.781 at 2); on the quickstart measured AL 1.67 without it, 1.71 and up in the
    recipes with it (which changed more than this head). Best with ``TargetHead`` and ``TargetNorm``.
    """

    sample_keys: ClassVar[tuple[str, ...]] = ("input_ids", "aux_hidden_states", "loss_mask", "last_hidden_state")
    kv_rank: ClassVar[int] = 1

    def __init__(self, samples: int = 128, strength: float = 8.0, kv_head: int | None = None) -> None:
        super().__init__(samples, kv_head)
        self.strength = strength

    def at_fit_start(
        self, draft: Eagle3Draft, samples: Samples, *, kv_head: int | None, max_length: int
    ) -> dict[str, float]:
        cols = _columns(samples, self.sample_keys)
        own = plant_self_head(
            draft, cols["input_ids"], cols["aux_hidden_states"], cols["last_hidden_state"], cols["loss_mask"],
            kv_head=kv_head, strength=self.strength,
        )
        rank_zero_info(
            f"current-token head planted from {int(own['tokens'])} supervised sample tokens: its bigram guess "
            f"agrees with the target's next state for {own['bigram_accuracy']:.0%} of held-out positions"
        )
        return {f"self_{k}": v for k, v in own.items()}


class CopyHead(PlantedHead):
    """Plant a copy (induction) head (``copy_head.plant_copy_head``): "copy what followed the earlier
    occurrence of this token", fitted on the first ``samples`` training samples.

    Why: small targets repeat themselves, and a one-layer draft can express the rule but does
    not discover it on a CPU budget. ``strength``: the copied token's vector relative to the
    hidden stream; ``sharpness``: the query scale (softmax temperature); ``previous``: weight of
    the previous-token match (0: one token only), which tells apart two occurrences of a token
    by the token before each. Rewrites ``fc``. Measured AL on the quickstart: no copy head 1.45,
    this head at ``previous=0`` 1.61, at ``previous=0.5`` 1.67 (600-step validation AL 1.666 at
    0 -> 1.724 at 0.5, 1.717 at 1.0). Needs ``TargetHead`` and ``TargetNorm`` (it writes where
    they read).
    """

    sample_keys: ClassVar[tuple[str, ...]] = ("input_ids", "aux_hidden_states")
    kv_rank: ClassVar[int] = 0  # first choice: it held head 0 before the current-token head existed

    def __init__(
        self,
        samples: int = 128,
        strength: float = 2.0,
        sharpness: float = 3.0,
        previous: float = 0.0,
        kv_head: int | None = None,
    ) -> None:
        super().__init__(samples, kv_head)
        if previous < 0:
            raise ValueError(f"{FIELD}: CopyHead previous must be >= 0 (0: off), got {previous}")
        self.strength, self.sharpness, self.previous = strength, sharpness, previous

    def at_fit_start(
        self, draft: Eagle3Draft, samples: Samples, *, kv_head: int | None, max_length: int
    ) -> dict[str, float]:
        cols = _columns(samples, self.sample_keys)
        copy = plant_copy_head(
            draft, cols["input_ids"], cols["aux_hidden_states"], kv_head=kv_head, max_position=max(512, max_length),
            sharpness=self.sharpness, strength=self.strength, previous=self.previous,
        )
        previous = (
            f"; the previous token for {copy['previous_token_accuracy']:.0%} ({int(copy['previous_dims'])} dims)"
            if "previous_dims" in copy
            else ""
        )
        rank_zero_info(
            f"copy head planted from {int(copy['tokens'])} sample tokens: keys recover the slot's token for "
            f"{copy['key_token_accuracy']:.0%} of held-out positions ({int(copy['content_dims'])} content dims)"
            + previous
        )
        return copy


def assign_kv_heads(inits: Sequence[Eagle3Initializer], num_kv_heads: int) -> list[int | None]:
    """The key/value head of each planted head in ``inits`` (None for the others).

    Explicit ``kv_head`` claims first; every other head then takes the lowest unclaimed head,
    in ``kv_rank`` order and then list order: ``[CurrentTokenHead, CopyHead]`` puts the copy
    head on 0 and the current-token head on 1, a lone head on 0. Two heads on one key/value
    head, or more heads than the draft has, are refused.
    """
    heads = [(i, x) for i, x in enumerate(inits) if isinstance(x, PlantedHead)]
    out: list[int | None] = [None] * len(inits)
    claimed: dict[int, int] = {}
    for i, head in heads:
        if head.kv_head is None:
            continue
        if head.kv_head >= num_kv_heads:
            raise ValueError(
                f"{FIELD}[{i}]: {type(head).__name__} kv_head {head.kv_head} is outside the draft's "
                f"{num_kv_heads} key/value heads; pick 0..{num_kv_heads - 1} or leave kv_head unset"
            )
        if head.kv_head in claimed:
            j = claimed[head.kv_head]
            raise ValueError(
                f"{FIELD}[{j}] ({type(inits[j]).__name__}) and [{i}] ({type(head).__name__}) both claim key/value "
                f"head {head.kv_head}; give each its own kv_head or leave kv_head unset"
            )
        claimed[head.kv_head], out[i] = i, head.kv_head
    free = iter([k for k in range(num_kv_heads) if k not in claimed])
    for i, head in sorted((p for p in heads if p[1].kv_head is None), key=lambda p: (p[1].kv_rank, p[0])):
        out[i] = next(free, None)
        if out[i] is None:
            names = " and ".join(type(h).__name__ for _, h in heads)
            raise ValueError(
                f"{FIELD}: {names} each need their own key/value head; this draft has {num_kv_heads}"
            )
    return out


__all__ = [
    "CopyHead",
    "CurrentTokenHead",
    "Eagle3Initializer",
    "PlantedHead",
    "SampleSource",
    "TargetFC",
    "TargetHead",
    "TargetMidlayer",
    "TargetNorm",
    "assign_kv_heads",
]
