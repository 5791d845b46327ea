"""A test-only algorithm registered from outside the package runs fit -> evaluate -> export hf through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/toy_algorithm/toy-tiny.yaml"


def cli(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "specforge_lightning", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_toy_plugin_fits_evaluates_and_exports_through_the_cli(tmp_path):
    feats, run = tmp_path / "feats", tmp_path / "run"
    cli("fit", "--config", CONFIG, f"--data.init_args.prepare.output_dir={feats}", f"--trainer.default_root_dir={run}")
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["specforge_algorithm"]["name"] == "toy"

    fit_config = tmp_path / "fit.yaml"  # the recipe with this run's features
    fit_config.write_text(Path(ROOT / CONFIG).read_text().replace("      target: tiny-llama",
                                                                  f"      output_dir: {feats}\n      target: tiny-llama"))
    out = tmp_path / "eval" / "al.json"
    cli("evaluate", "--config", str(fit_config), "--ckpt_path", str(ckpt), "--output", str(out), "--num_prompts", "2",
        "--max_new_tokens", "8", "--k", "3", "--dtype", "float32", "--threads", "1", "--device", "cpu")
    result = json.loads(out.read_text())
    assert result["draft"]["algorithm"] == "toy" and result["settings"]["drafting"] == "toy: one token per verify step"
    assert result["identical_outputs"] == result["num_prompts"] == 2
    assert 1.0 <= result["acceptance_length"] <= 2.0  # one drafted token per verify step at most

    folder = tmp_path / "hf"
    printed = cli("export", "--ckpt_path", str(ckpt), "--format", "hf", "--output_dir", str(folder))
    assert "exported toy" in printed
    assert json.loads((folder / "config.json").read_text())["specforge_format"] == "tests.toy_algorithm"
    from safetensors.torch import load_file

    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        assert torch.equal(tensor, stored["draft." + name]), name
