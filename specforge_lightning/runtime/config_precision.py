"""Precision ``auto`` in a config, turned into concrete values before anything is built.

Why: the Trainer, the model's frozen tensors and the capture each need a concrete dtype, and
the features' identity records the capture dtype; so ``auto`` is decided once, from the
hardware each stage runs on (``precision.resolve_precision``), and written back into the config.
The saved ``config.yaml`` and the manifest then say what was used, never ``auto``; an explicit
value always wins, stage by stage. Works on any nested mapping (a jsonargparse Namespace or dicts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from specforge_lightning.runtime import precision
from specforge_lightning.runtime.precision import DTYPE_ALIASES, PrecisionChoice, resolve_precision

# Capture (and regeneration) load the target on the CPU (``target.zoo.load_target``).
PREPARE_DEVICE = "cpu"
# Where each stage's value lives in a fit config.
FIELDS = {
    "train": ("trainer", "precision"),
    "frozen": ("model", "init_args", "frozen_dtype"),
    "compute": ("data", "init_args", "prepare", "compute_dtype"),
    "capture_storage": ("data", "init_args", "prepare", "capture_dtype"),
}
# ``trainer.accelerator`` -> the device ``resolve_precision`` decides for.
ACCELERATOR_DEVICES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "auto": "auto"}


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def _once(probe: Callable[[], float] | None) -> Callable[[], float]:
    """The bf16 probe, run at most once however many stages ask (it times matmuls)."""
    memo: list[float] = []

    def run() -> float:
        if not memo:
            memo.append((probe or precision.bf16_slowdown)())
        return memo[0]

    return run


def resolve_capture_dtypes(compute_dtype: str, capture_dtype: str, **hardware: Any) -> tuple[str, str, PrecisionChoice | None]:
    """``(compute_dtype, capture_dtype, choice)`` with ``auto`` decided for the capture device.

    An ``auto`` capture dtype follows an explicit compute dtype (storing what was computed,
    without a cast); ``choice`` is None when the hardware decided nothing. ``hardware``:
    ``probe``/``flags``/``capability`` of ``resolve_precision`` (tests).
    """
    if not is_auto(compute_dtype):
        if is_auto(capture_dtype):
            capture_dtype = DTYPE_ALIASES.get(str(compute_dtype).lower(), compute_dtype)
        return compute_dtype, capture_dtype, None
    choice = resolve_precision(
        "auto", PREPARE_DEVICE, overrides={"compute": compute_dtype, "capture_storage": capture_dtype}, **hardware
    )
    return choice.compute, capture_dtype if not is_auto(capture_dtype) else choice.capture_storage, choice


def _get(cfg: Any, path: tuple[str, ...]) -> Any:
    node = cfg
    for key in path:
        if node is None:
            return None
        node = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
    return node


def _set(cfg: Any, path: tuple[str, ...], value: str) -> None:
    parent = _get(cfg, path[:-1])
    if hasattr(parent, "__setitem__"):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def _train_device(accelerator: Any) -> str:
    name = accelerator if isinstance(accelerator, str) else None
    if name is None or name.lower() not in ACCELERATOR_DEVICES:
        raise ValueError(
            f"trainer.precision / model.init_args.frozen_dtype: auto is decided for trainer.accelerator cpu, gpu, "
            f"cuda or auto, not {accelerator!r}; set trainer.precision and frozen_dtype explicitly"
        )
    return ACCELERATOR_DEVICES[name.lower()]


def resolve_run_config(cfg: Any, **hardware: Any) -> PrecisionChoice | None:
    """Replace every ``auto`` of a fit config in place (``FIELDS``); the choice to announce, or None.

    ``trainer.precision`` and ``frozen_dtype`` are decided for ``trainer.accelerator``, the
    capture dtypes for ``PREPARE_DEVICE``. Raises ValueError naming the field for a value no
    stage accepts. ``hardware`` as in ``resolve_capture_dtypes``.
    """
    values = {stage: _get(cfg, path) for stage, path in FIELDS.items()}
    if not any(is_auto(v) for v in values.values()):
        return None
    hardware = {**hardware, "probe": _once(hardware.get("probe"))}
    reasons: list[str] = []
    final = dict(values)
    if is_auto(values["train"]) or is_auto(values["frozen"]):
        device = _train_device(_get(cfg, ("trainer", "accelerator")))
        train = {s: values[s] for s in ("train", "frozen")}
        choice = resolve_precision("auto", device, overrides=train, **hardware)
        reasons.append(choice.reason)
        final.update({s: getattr(choice, s) for s, v in train.items() if is_auto(v)})
    if is_auto(values["compute"]) or is_auto(values["capture_storage"]):
        compute, capture, choice = resolve_capture_dtypes(values["compute"], values["capture_storage"], **hardware)
        if choice is not None and choice.reason not in reasons:
            reasons.append(f"capture: {choice.reason}" if reasons else choice.reason)
        final.update(compute=compute, capture_storage=capture)
    for stage, path in FIELDS.items():
        if is_auto(values[stage]):
            _set(cfg, path, final[stage])
    shown = {s: "unset" if v is None else str(v) for s, v in final.items()}
    return PrecisionChoice(reason="; ".join(reasons) or "set explicitly", **shown)
