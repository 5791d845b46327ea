"""Precision ``auto`` and plain progress wired into the commands (hardware faked)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from specforge_lightning.cli import main
from specforge_lightning.runtime import precision as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AVX2_CPU = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
BF16_CPU = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})


@pytest.fixture()
def cpu(monkeypatch):
    """``cpu("avx2")`` or ``cpu("bf16")``: this process's CPU as precision ``auto`` sees it."""

    def fake(kind: str) -> None:
        flags, capability = (AVX2_CPU, "AVX2") if kind == "avx2" else (BF16_CPU, "AVX512")
        monkeypatch.setattr(P, "read_cpu_flags", lambda: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(P, "bf16_slowdown", lambda *a, **k: 6.0 if kind == "avx2" else 0.5)
        P._reset_announce()

    yield fake
    P._reset_announce()


def _printed_config(capsys, *extra):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", "configs/eagle3.yaml", *extra, "--print_config"])
    assert exit.value.code == 0
    out = capsys.readouterr()
    return yaml.safe_load(out.out), out.err


def _stages(cfg):
    prep = cfg["data"]["init_args"]["prepare"]
    return (cfg["trainer"]["precision"], cfg["model"]["init_args"]["frozen_dtype"], prep["compute_dtype"],
            prep["capture_dtype"])


def test_the_recipe_resolves_auto_to_float32_on_an_avx2_cpu(cpu, capsys):
    cpu("avx2")
    cfg, err = _printed_config(capsys)
    assert _stages(cfg) == ("32-true", "float32", "float32", "float32")
    assert err.count("precision: float32: this CPU has no native bf16 (AVX2") == 1  # announced once


def test_the_recipe_resolves_auto_to_bf16_on_a_bf16_cpu(cpu, capsys):
    cpu("bf16")
    cfg, _ = _printed_config(capsys)
    assert _stages(cfg) == ("bf16-mixed", "bfloat16", "bfloat16", "bfloat16")


def test_an_explicit_precision_wins_over_auto(cpu, capsys):
    cpu("bf16")
    cfg, err = _printed_config(capsys, "--trainer.precision=32-true")
    assert _stages(cfg) == ("32-true", "bfloat16", "bfloat16", "bfloat16")
    assert "explicit in the config: trainer.precision=32-true" in err


def test_a_wrong_precision_value_is_refused_naming_the_field(cpu, capsys):
    cpu("avx2")
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", "configs/eagle3.yaml", "--model.init_args.frozen_dtype=bf17", "--print_config"])
    assert exit.value.code == 2 and "frozen_dtype: unknown dtype 'bf17'" in capsys.readouterr().err


def test_prepare_with_auto_records_the_resolved_dtype_and_the_check_compares_it(cpu, tmp_path):
    from specforge_lightning.data.manifest import FeatureMismatchError, read_manifest
    from specforge_lightning.datamodules.checks import check_features
    from specforge_lightning.target.prepare_config import PrepareConfig

    cpu("avx2")
    out = tmp_path / "feats"
    main(["prepare", "--config", "configs/eagle3-tiny.yaml", f"--output_dir={out}", "--num_samples=6",
          "--num_val_samples=2", "--capture_dtype=auto", "--compute_dtype=auto"])
    manifest = read_manifest(out)
    assert manifest["capture_dtype"] == "float32"
    prep = yaml.safe_load(open(os.path.join(ROOT, "configs/eagle3-tiny.yaml")))["data"]["init_args"]["prepare"]
    auto = PrepareConfig(**{**prep, "output_dir": str(out), "num_samples": 6, "num_val_samples": 2,
                            "capture_dtype": "auto", "compute_dtype": "auto"})
    check_features(manifest, auto, None, "features")  # auto compares as float32 here
    cpu("bf16")
    with pytest.raises(FeatureMismatchError, match="capture_dtype"):
        check_features(manifest, auto, None, "features")


def test_a_piped_fit_prints_plain_progress_lines(tmp_path):
    env = {**os.environ, "SPECFORGE_PROGRESS_INTERVAL_S": "0.2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "specforge_lightning", "fit", "--config", "configs/eagle3-tiny.yaml",
           f"--data.init_args.prepare.output_dir={tmp_path / 'feats'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
           "--trainer.logger=false", "--trainer.max_steps=6", "--trainer.val_check_interval=6"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("fit: step")]
    assert lines and "done in" in lines[-1] and "step 6/6" in lines[-1]
    assert "\r" not in done.stdout  # no redrawn bar in the log
