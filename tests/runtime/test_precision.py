"""Precision ``auto`` per stage: CUDA, bf16-capable CPU, AVX2 CPU, explicit overrides (hardware faked)."""

import io
import math
import time

import pytest
import torch

from specforge_lightning.runtime import precision as P
from specforge_lightning.runtime.precision import (
    announce,
    bf16_slowdown,
    cpu_has_native_bf16,
    format_choice,
    read_cpu_flags,
    resolve_precision,
    torch_dtype,
)

BF16_CPU = {"fpu", "avx2", "avx512f", "avx512_bf16"}
AMX_CPU = {"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"}
AVX2_CPU = {"fpu", "sse4_2", "avx", "avx2", "fma"}
AVX512_NO_BF16 = {"fpu", "avx2", "avx512f", "avx512bw"}


def no_probe() -> float:
    raise AssertionError("the probe must not run here")


def assert_all(choice, dtype, train):
    assert (choice.compute, choice.capture_storage, choice.frozen, choice.train) == (dtype, dtype, dtype, train)


def test_cuda_with_bf16_picks_bf16():
    choice = resolve_precision("auto", "cuda", probe=no_probe, cuda_bf16=True)
    assert_all(choice, "bfloat16", "bf16-mixed")
    assert choice.reason.startswith("bf16:") and "supports bf16" in choice.reason


def test_cuda_without_bf16_picks_float32():
    choice = resolve_precision("auto", "cuda:1", probe=no_probe, cuda_bf16=False)
    assert_all(choice, "float32", "32-true")
    assert choice.reason.startswith("float32:")


@pytest.mark.parametrize("flags,flag", [(BF16_CPU, "avx512_bf16"), (AMX_CPU, "amx_bf16"), ({"fp", "asimd", "bf16"}, "bf16")])
def test_cpu_with_native_bf16_flag_picks_bf16_without_probing(flags, flag):
    choice = resolve_precision("auto", "cpu", probe=no_probe, flags=flags, capability="AVX512")
    assert_all(choice, "bfloat16", "bf16-mixed")
    assert choice.reason.startswith("bf16: this CPU has native bf16") and flag in choice.reason


def test_avx2_cpu_picks_float32_and_says_how_much_slower():
    choice = resolve_precision("auto", "cpu", probe=lambda: 7.94, flags=AVX2_CPU, capability="AVX2")
    assert_all(choice, "float32", "32-true")
    assert choice.reason.startswith("float32: this CPU has no native bf16 (AVX2")
    assert "bf16 matmul measured 7.9 times slower" in choice.reason


def test_avx512_without_bf16_flag_is_not_native():
    """The capability string alone would say AVX512; the flags say no bf16."""
    native, why = cpu_has_native_bf16(flags=AVX512_NO_BF16, capability="AVX512", probe=lambda: 2.5)
    assert not native and "AVX512" in why and "2.5 times slower" in why


def test_flags_unreadable_avx2_capability_decides():
    native, why = cpu_has_native_bf16(flags=[], capability="AVX2", probe=lambda: 0.4)
    assert not native and "(AVX2)" in why


@pytest.mark.parametrize("ratio,native", [(0.45, True), (1.0, True), (3.0, False)])
def test_flags_unreadable_ambiguous_capability_uses_probe(ratio, native):
    got, why = cpu_has_native_bf16(flags=[], capability="AVX512", probe=lambda: ratio)
    assert got is native and "flags unreadable" in why and "measured" in why


def test_a_failing_probe_falls_back_to_float32():
    def broken() -> float:
        raise RuntimeError("no bf16 kernel")

    native, why = cpu_has_native_bf16(flags=[], capability="SVE256", probe=broken)
    assert not native and "probe failed" in why
    native, why = cpu_has_native_bf16(flags=AVX2_CPU, capability="AVX2", probe=broken)
    assert not native and "measured" not in why


@pytest.mark.parametrize("requested,dtype,train", [
    ("float32", "float32", "32-true"), ("32-true", "float32", "32-true"), ("bf16", "bfloat16", "bf16-mixed"),
    ("bf16-mixed", "bfloat16", "bf16-mixed"), ("bf16-true", "bfloat16", "bf16-true"), ("16-mixed", "float16", "16-mixed"),
])
def test_explicit_request_wins_and_probes_nothing(requested, dtype, train):
    # bf16 explicitly on an AVX2 CPU, float32 explicitly on a bf16 CPU: the config wins either way
    for flags in (AVX2_CPU, BF16_CPU):
        choice = resolve_precision(requested, "cpu", probe=no_probe, flags=flags, capability="AVX2")
        assert_all(choice, dtype, train)
        assert "set explicitly" in choice.reason


def test_explicit_stage_overrides_win_over_auto():
    choice = resolve_precision(
        "auto", "cpu", probe=no_probe, flags=BF16_CPU, capability="AVX512",
        overrides={"compute": "float32", "train": "32-true", "capture_storage": None, "frozen": "auto"},
    )
    assert (choice.compute, choice.train) == ("float32", "32-true")
    assert (choice.capture_storage, choice.frozen) == ("bfloat16", "bfloat16")  # None/auto: still decided
    assert "compute_dtype=float32" in choice.reason and "trainer.precision=32-true" in choice.reason


def test_stage_override_beats_whole_run_request():
    choice = resolve_precision("bf16", overrides={"capture_storage": "fp32"}, probe=no_probe)
    assert choice.capture_storage == "float32" and choice.compute == "bfloat16"


def test_all_stages_explicit_probes_nothing():
    given = {"compute": "bf16", "capture_storage": "bfloat16", "train": "bf16-mixed", "frozen": "float32"}
    choice = resolve_precision("auto", "cpu", probe=no_probe, flags=AVX2_CPU, capability="AVX2", overrides=given)
    assert (choice.compute, choice.capture_storage, choice.train, choice.frozen) == (
        "bfloat16", "bfloat16", "bf16-mixed", "float32")


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"trainer\.precision: 'bf17-mixed'"):
        resolve_precision(overrides={"train": "bf17-mixed"}, probe=no_probe, flags=BF16_CPU)
    with pytest.raises(ValueError, match=r"compute_dtype: unknown dtype 'int8'"):
        resolve_precision(overrides={"compute": "int8"}, probe=no_probe, flags=BF16_CPU)
    with pytest.raises(ValueError, match="unknown precision stage"):
        resolve_precision(overrides={"evaluate": "float32"}, probe=no_probe, flags=BF16_CPU)
    with pytest.raises(ValueError, match="precision: unknown value 'fast'"):
        resolve_precision("fast")
    with pytest.raises(ValueError, match="device 'tpu'"):
        resolve_precision(device="tpu", flags=BF16_CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda_is_an_error_and_auto_means_cpu():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_precision(device="cuda")
    assert resolve_precision(device="auto", flags=BF16_CPU, probe=no_probe).compute == "bfloat16"


def test_choice_helpers():
    choice = resolve_precision("auto", "cpu", probe=lambda: 5.0, flags=AVX2_CPU, capability="AVX2")
    assert choice.dtype("compute") is torch.float32 and choice.dtype("frozen") is torch.float32
    with pytest.raises(ValueError, match="no torch dtype"):
        choice.dtype("train")
    assert choice.as_config() == {"compute_dtype": "float32", "capture_dtype": "float32",
                                  "trainer.precision": "32-true", "frozen_dtype": "float32"}
    assert torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        torch_dtype("float8")


def test_announce_prints_one_line_once_per_process():
    P._reset_announce()
    try:
        choice = resolve_precision("auto", "cpu", probe=lambda: 6.0, flags=AVX2_CPU, capability="AVX2")
        out = io.StringIO()
        assert announce(choice, stream=out)
        assert not announce(choice, stream=out)
        text = out.getvalue()
        assert text.count("\n") == 1 and text == format_choice(choice) + "\n"
        assert text.startswith("precision: float32: this CPU has no native bf16 (AVX2")
        assert "6.0 times slower" in text and "train 32-true" in text
    finally:
        P._reset_announce()


def test_read_cpu_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    assert read_cpu_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16"}
    assert "bf16" in read_cpu_flags(str(arm))
    assert read_cpu_flags(str(tmp_path / "missing")) is None


def test_real_probe_is_subsecond_finite_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    t0 = time.perf_counter()
    ratio = bf16_slowdown(reps=3)
    assert time.perf_counter() - t0 < 1.0
    assert math.isfinite(ratio) and ratio > 0
    assert torch.equal(torch.rand(3), expected)


def test_this_machine_follows_its_flags():
    flags = read_cpu_flags()
    if not flags:
        pytest.skip("/proc/cpuinfo unreadable")
    native = any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))
    choice = resolve_precision("auto", "cpu", probe=lambda: 1.0)
    assert choice.compute == ("bfloat16" if native else "float32")
