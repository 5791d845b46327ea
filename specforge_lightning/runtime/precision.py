"""Precision ``auto``: one dtype per stage, chosen from the hardware this process runs on.

Why: bf16 halves memory and, on hardware with native bf16 (CUDA from Ampere, CPUs with
AVX512-BF16 or AMX), about halves matmul time. On a CPU without it PyTorch emulates bf16 and a
forward pass becomes several times SLOWER than float32, so a recipe that hard-codes bf16 is
fast on one machine and slow on the next. The shipped recipes say ``auto``; this module turns
that into a dtype per stage:

- ``compute``: the target's forward for regeneration and hidden-state capture;
- ``capture_storage``: the dtype the captured features are written in. It follows ``compute``:
  bf16 storage of bf16-computed values is exact; on the float32 path the features stay float32
  (exactly what was computed, and every algorithm can read them without a cast under
  ``32-true``). An explicit ``capture_dtype: bfloat16`` is still allowed there: a plain cast
  with a 2^-8 relative rounding, no bf16 arithmetic, half the disk.
- ``train``: the Lightning ``trainer.precision`` string (``bf16-mixed`` keeps fp32 weights);
- ``frozen``: the frozen tensors the draft borrows from the target (embedding, teacher head).

Evaluation is not a stage here: it keeps its own ``--dtype`` (float32 verification is exact).
An explicit value in a config always wins over ``auto``, per stage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO

import torch

STAGES = ("compute", "capture_storage", "train", "frozen")
# The config field behind each stage, so an error names what to fix.
STAGE_FIELDS = {
    "compute": "compute_dtype",
    "capture_storage": "capture_dtype",
    "train": "trainer.precision",
    "frozen": "frozen_dtype",
}
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "16": "float16",
}
LIGHTNING_PRECISIONS = frozenset(
    {"64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine",
     "transformer-engine-float16", "64", "32", "16", "bf16"}
)
# A whole-run request (``precision: ...``) -> (dtype for compute/storage/frozen, Lightning string).
FAMILIES = {
    "bf16": ("bfloat16", "bf16-mixed"),
    "bfloat16": ("bfloat16", "bf16-mixed"),
    "bf16-mixed": ("bfloat16", "bf16-mixed"),
    "bf16-true": ("bfloat16", "bf16-true"),
    "float32": ("float32", "32-true"),
    "fp32": ("float32", "32-true"),
    "32": ("float32", "32-true"),
    "32-true": ("float32", "32-true"),
    "float16": ("float16", "16-mixed"),
    "fp16": ("float16", "16-mixed"),
    "16-mixed": ("float16", "16-mixed"),
}
# /proc/cpuinfo flags that mean bf16 dot products in hardware (x86: AVX512-BF16, AMX; arm64: BF16).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# torch capabilities that cannot have native bf16; anything else (AVX512, SVE, ...) is ambiguous.
NO_BF16_CAPABILITIES = frozenset({"DEFAULT", "NO AVX", "AVX", "AVX2"})
# The probe calls bf16 native when a bf16 matmul is no slower than float32 (native: ~0.5x;
# emulated: 2-30x).
NATIVE_BF16_MAX_SLOWDOWN = 1.0

_announced = False


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype of each stage and why it was chosen (``reason`` is what ``announce`` prints)."""

    compute: str
    capture_storage: str
    train: str
    frozen: str
    reason: str

    def dtype(self, stage: str) -> torch.dtype:
        """The ``torch.dtype`` of a dtype stage (``train`` is a Lightning string, not a dtype)."""
        if stage not in ("compute", "capture_storage", "frozen"):
            raise ValueError(f"stage {stage!r} has no torch dtype; use compute, capture_storage or frozen")
        return torch_dtype(getattr(self, stage))

    def as_config(self) -> dict[str, str]:
        """The choice keyed by the config field each stage comes from (for logs and manifests)."""
        return {STAGE_FIELDS[s]: getattr(self, s) for s in STAGES}


def torch_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"float32"``/... -> ``torch.dtype``; a clear error otherwise."""
    canonical = DTYPE_ALIASES.get(str(name).lower())
    if canonical is None:
        raise ValueError(f"unknown dtype {name!r}; use bfloat16, float32, float16 or auto")
    return getattr(torch, canonical)


def bf16_slowdown(reps: int = 3, *, shape: tuple[int, int, int] = (256, 576, 1536), max_seconds: float = 0.5) -> float:
    """Measured time of a bf16 matmul divided by the same float32 matmul (median of ``reps``).

    The default shape is one SmolLM2 MLP projection over 256 tokens, the work capture does.
    A private generator keeps the global RNG untouched (seeded runs stay bit-identical);
    ``max_seconds`` caps the bf16 side where emulation is very slow, so the probe stays
    sub-second on any CPU.
    """
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a32 = torch.randn(m, k, generator=gen)
    b32 = torch.randn(k, n, generator=gen)
    times: dict[torch.dtype, list[float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = a32.to(dtype), b32.to(dtype)
        torch.matmul(a, b)  # warm-up: first-call dispatch and allocation
        spent = 0.0
        samples: list[float] = []
        while len(samples) < max(1, reps) and (not samples or spent < max_seconds):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            samples.append(time.perf_counter() - t0)
            spent += samples[-1]
        times[dtype] = sorted(samples)
    fp32 = times[torch.float32][len(times[torch.float32]) // 2]
    bf16 = times[torch.bfloat16][len(times[torch.bfloat16]) // 2]
    return bf16 / max(fp32, 1e-9)


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags from ``/proc/cpuinfo`` (x86 ``flags``, arm64 ``Features``); None if unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def _describe_slowdown(ratio: float) -> str:
    if ratio >= 1.0:
        return f"bf16 matmul measured {ratio:.1f} times slower"
    return f"bf16 matmul measured {1.0 / max(ratio, 1e-9):.1f} times faster"


def _safe_probe(probe: Callable[[], float]) -> float | None:
    try:
        return float(probe())
    except Exception:  # a probe that cannot run must not stop a run: fall back to the flags' answer
        return None


def cpu_has_native_bf16(
    flags: Iterable[str] | None = None,
    capability: str | None = None,
    probe: Callable[[], float] | None = None,
) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the reason in words.

    Order: ``/proc/cpuinfo`` flags decide where readable (the capability string alone does not:
    AVX512 exists with and without AVX512-BF16). Without flags, a capability that cannot have
    bf16 (AVX2 and below) decides; otherwise the timed ``probe`` (bf16 / float32 matmul time)
    does. On a "no" the probe still runs once so the reason says how much slower bf16 is.
    ``flags``, ``capability`` and ``probe`` are injectable so tests fake any machine.
    """
    flag_set = frozenset(flags) if flags is not None else read_cpu_flags()
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    probe = probe or bf16_slowdown
    if flag_set:
        found = [f for f in NATIVE_BF16_FLAGS if f in flag_set]
        if found:
            return True, f"this CPU has native bf16 ({', '.join(found)}; {capability})"
        ratio = _safe_probe(probe)
        measured = f"; {_describe_slowdown(ratio)}" if ratio is not None else ""
        return False, f"this CPU has no native bf16 ({capability}, no avx512_bf16/amx_bf16 flag){measured}"
    if capability.upper() in NO_BF16_CAPABILITIES:
        ratio = _safe_probe(probe)
        measured = f"; {_describe_slowdown(ratio)}" if ratio is not None else ""
        return False, f"this CPU has no native bf16 ({capability}){measured}"
    ratio = _safe_probe(probe)
    if ratio is None:
        return False, f"CPU flags unreadable and the bf16 probe failed ({capability}): float32 is the safe choice"
    native = ratio <= NATIVE_BF16_MAX_SLOWDOWN
    what = "native bf16" if native else "no native bf16"
    return native, f"this CPU has {what} ({capability}, flags unreadable; {_describe_slowdown(ratio)})"


def _device_kind(device: str, cuda_bf16: bool | None) -> str:
    d = str(device).lower()
    if d == "auto":
        return "cuda" if cuda_bf16 is not None or torch.cuda.is_available() else "cpu"
    if d in ("cuda", "gpu") or d.startswith("cuda:"):
        return "cuda"
    if d == "cpu":
        return "cpu"
    raise ValueError(f"device {device!r}: use cpu, cuda, cuda:N, gpu or auto")


def _auto(device: str, probe, flags, capability, cuda_bf16) -> tuple[str, str]:
    """(dtype for every dtype stage, reason) for ``auto`` on this device."""
    if _device_kind(device, cuda_bf16) == "cuda":
        if cuda_bf16 is None:
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use device cpu")
            cuda_bf16 = bool(torch.cuda.is_bf16_supported())
            name = torch.cuda.get_device_name()
        else:
            name = "the CUDA device"
        if cuda_bf16:
            return "bfloat16", f"bf16: {name} supports bf16"
        return "float32", f"float32: {name} has no bf16 support"
    native, why = cpu_has_native_bf16(flags=flags, capability=capability, probe=probe)
    return ("bfloat16" if native else "float32"), f"{'bf16' if native else 'float32'}: {why}"


def _explicit(stage: str, value: str) -> str:
    """A config's explicit value for one stage, validated and normalised."""
    if stage == "train":
        if str(value) not in LIGHTNING_PRECISIONS:
            raise ValueError(
                f"{STAGE_FIELDS[stage]}: {value!r} is not a Lightning precision; "
                f"use auto, bf16-mixed, 32-true, 16-mixed, bf16-true or 64-true"
            )
        return str(value)
    canonical = DTYPE_ALIASES.get(str(value).lower())
    if canonical is None:
        raise ValueError(f"{STAGE_FIELDS[stage]}: unknown dtype {value!r}; use auto, bfloat16, float32 or float16")
    return canonical


def resolve_precision(
    requested: str | None = "auto",
    device: str = "cpu",
    probe: Callable[[], float] | None = None,
    *,
    overrides: Mapping[str, str | None] | None = None,
    flags: Iterable[str] | None = None,
    capability: str | None = None,
    cuda_bf16: bool | None = None,
) -> PrecisionChoice:
    """The precision of each stage for a run that asks for ``requested`` on ``device``.

    ``requested``: ``auto``/None (decide from the hardware), or a whole-run value such as
    ``bf16``, ``bf16-mixed``, ``float32``, ``32-true``, ``16-mixed``. ``overrides`` maps a stage
    (``compute``, ``capture_storage``, ``train``, ``frozen``) to a config's explicit value;
    None or ``auto`` there means "not set". Explicit values always win, stage by stage, and the
    hardware is not probed when nothing is left to decide. ``probe``, ``flags``, ``capability``
    and ``cuda_bf16`` replace the hardware checks (tests).
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None and str(v).lower() != "auto"}
    unknown = sorted(set(given) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown precision stage(s) {unknown}; stages are {', '.join(STAGES)}")
    explicit = {stage: _explicit(stage, value) for stage, value in given.items()}
    req = "auto" if requested is None else str(requested).lower()
    if req == "auto":
        if len(explicit) == len(STAGES):
            dtype, reason = explicit["compute"], "set explicitly"
        else:
            dtype, reason = _auto(device, probe, flags, capability, cuda_bf16)
        train = "bf16-mixed" if dtype == "bfloat16" else "32-true"
    elif req in FAMILIES:
        dtype, train = FAMILIES[req]
        reason = f"{dtype}: set explicitly (precision: {requested})"
    else:
        raise ValueError(
            f"precision: unknown value {requested!r}; use auto, bf16, bf16-mixed, bf16-true, "
            f"float32, 32-true or 16-mixed"
        )
    chosen = {"compute": dtype, "capture_storage": dtype, "train": train, "frozen": dtype}
    chosen.update(explicit)
    if explicit:
        named = (f"{STAGE_FIELDS[s]}={explicit[s]}" for s in STAGES if s in explicit)
        reason += "; explicit in the config: " + ", ".join(named)
    return PrecisionChoice(reason=reason, **chosen)


def format_choice(choice: PrecisionChoice) -> str:
    """The one line ``announce`` prints: the reason, then every stage's value."""
    stages = ", ".join(f"{s} {getattr(choice, s)}" for s in STAGES)
    return f"precision: {choice.reason} [{stages}]"


def announce(choice: PrecisionChoice, *, stream: TextIO | None = None, force: bool = False) -> bool:
    """Print the choice once per process (prepare, fit and evaluate may each resolve it).

    Returns whether it printed. Goes to stderr by default, beside Lightning's own start-up
    lines, so commands whose stdout is parsed stay clean.
    """
    global _announced
    if _announced and not force:
        return False
    _announced = True
    print(format_choice(choice), file=stream or sys.stderr, flush=True)
    return True


def _reset_announce() -> None:
    """Forget that the choice was printed (tests)."""
    global _announced
    _announced = False
