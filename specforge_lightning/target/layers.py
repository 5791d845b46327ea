"""Which target decoder layers a draft algorithm reads.

"Layer id i" is the output of decoder layer i (0-based), i.e. HF
``output_hidden_states[i + 1]``, the same convention as upstream and SGLang.
"""

from __future__ import annotations

from specforge_lightning.contracts import StrategySpec
from specforge_lightning.errors import UserError


class LayerChoiceError(UserError, ValueError):
    """The configured layers (preset or ids) do not fit the target, or none were chosen."""


def eagle3_layer_ids(num_layers: int) -> list[int]:
    """EAGLE3's low, middle and high layer: [1, N//2 - 1, N - 4]."""
    if num_layers < 5:
        raise LayerChoiceError(f"EAGLE3 needs a target with at least 5 layers, got {num_layers}")
    return [1, num_layers // 2 - 1, num_layers - 4]


def spread_layer_ids(num_layers: int, count: int) -> list[int]:
    """``count`` layers spread evenly between layer 1 and N-3 (the DFlash family's rule)."""
    if count < 1:
        raise LayerChoiceError(f"need at least one layer, got {count}")
    if count == 1:
        return [num_layers // 2]
    return [round(1 + i * (num_layers - 4) / (count - 1)) for i in range(count)]


def resolve_layer_ids(preset: str, num_layers: int, layer_ids: list[int] | None = None) -> list[int]:
    """Explicit ids win; otherwise ``preset`` is ``eagle3`` or ``spread:<count>``."""
    if layer_ids:
        bad = [i for i in layer_ids if not 0 <= i < num_layers]
        if bad:
            raise LayerChoiceError(f"layer ids {bad} are outside the target's {num_layers} layers")
        return list(layer_ids)
    if preset == "eagle3":
        return eagle3_layer_ids(num_layers)
    if preset.startswith("spread:"):
        return spread_layer_ids(num_layers, int(preset.split(":", 1)[1]))
    raise LayerChoiceError(f"unknown layer preset {preset!r}; use 'eagle3' or 'spread:<count>'")


def preset_or_spec(preset: str | None, spec: StrategySpec | None) -> str:
    """The configured preset, else the algorithm's (``StrategySpec.layer_preset``)."""
    if preset:
        return preset
    if spec is not None:
        return spec.layer_preset
    raise LayerChoiceError(
        "no target layers chosen: set data.init_args.prepare.layer_preset (e.g. 'eagle3' or 'spread:5') "
        "or data.init_args.prepare.layer_ids, or pass the algorithm's StrategySpec"
    )


def planned_layer_ids(
    num_layers: int, preset: str | None, layer_ids: list[int] | None, spec: StrategySpec | None
) -> list[int]:
    """The layers a capture reads: explicit ids, else the configured preset, else the algorithm's preset."""
    if layer_ids:
        return resolve_layer_ids("", num_layers, layer_ids)
    return resolve_layer_ids(preset_or_spec(preset, spec), num_layers)
