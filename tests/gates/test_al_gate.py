"""Acceptance-length gates on the REAL target, in CI: a regression floor and simulated/measured parity.

A fixed-seed float32 EAGLE3 run (``eagle3-gate.yaml``: 128 ShareGPT conversations, 240 steps) on
SmolLM2-135M-Instruct, then ``evaluate`` on 10 held-out prompts (64 new tokens, k=3, greedy).
``floor.json`` holds the floor and says how it was measured; both numbers are printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
FLOOR = json.loads((HERE / "floor.json").read_text())
PARITY = 0.1


def cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "specforge_lightning", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_real_target_acceptance_length_stays_above_the_floor_and_simulated_matches_measured(tmp_path):
    start = time.perf_counter()
    run = tmp_path / "run"
    cli("fit", "--config", "tests/gates/eagle3-gate.yaml", f"--data.init_args.prepare.output_dir={tmp_path / 'feats'}",
        f"--trainer.default_root_dir={run}")
    fitted = time.perf_counter() - start
    out = tmp_path / "al.json"
    cli("evaluate", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--output", str(out), "--num_prompts", "10",
        "--max_new_tokens", "64", "--k", "3", "--dtype", "float32", "--threads", "2", "--no_warmup")
    result = json.loads(out.read_text())
    measured, simulated = result["acceptance_length"], result["simulated_acceptance_length"]
    print(f"\nAL gate: measured {measured:.3f} (floor {FLOOR['floor']}), simulated {simulated:.3f} "
          f"(|diff| {abs(simulated - measured):.3f} <= {PARITY}); fit {fitted:.0f} s, total {time.perf_counter() - start:.0f} s")
    assert result["identical_outputs"] == result["num_prompts"] == 10
    assert measured >= FLOOR["floor"], f"measured AL {measured:.3f} fell below the floor {FLOOR['floor']}"
    assert abs(simulated - measured) <= PARITY, (simulated, measured)
