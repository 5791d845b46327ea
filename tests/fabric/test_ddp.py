"""The Fabric loop against the Trainer on 2 gloo ranks: same per-step losses, bit-identical weights.

CPU fp32, accumulation 2, batch 2 per rank (12 samples per rank: 3 optimizer steps an epoch),
4 optimizer steps, so an epoch boundary and its validation are crossed. Each rank is its own
process (scripts/run_rank.py, launched like torchrun does); every rank's exit code is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fabric.common import features, same_rows, same_weights
from tests.integration.rank_launch import launch_ranks, logs_tail

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "scripts" / "run_rank.py"
WORLD = 2


def launch(out: Path, *args: str, timeout: float = 240) -> list[int]:
    """run_rank.py on ``WORLD`` ranks; each rank's exit code (every process is gone afterwards)."""
    out.mkdir(parents=True)
    return launch_ranks(SCRIPT, WORLD, out, "--out", str(out), *args, timeout=timeout)


def _tail(out: Path) -> str:
    return logs_tail(out, WORLD)


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return features(tmp_path_factory.mktemp("fabric_ddp") / "features")


def run(tmp: Path, feats: Path, loop: str, algorithm: str) -> Path:
    out = tmp / loop
    codes = launch(out, "--loop", loop, "--algorithm", algorithm, "--features", str(feats),
                   "--root", str(tmp / f"{loop}-root"), "--max_steps", "4", "--accumulate", "2")
    assert codes == [0] * WORLD, f"{loop}: exit codes {codes}\n{_tail(out)}"
    return out


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash"])
def test_two_gloo_ranks_same_losses_and_bit_identical_weights(feats, tmp_path, algorithm):
    trainer, fabric = run(tmp_path, feats, "trainer", algorithm), run(tmp_path, feats, "fabric", algorithm)
    ids = []
    for rank in range(WORLD):
        rows_t = json.loads((trainer / f"rows_rank{rank}.json").read_text())
        rows_f = json.loads((fabric / f"rows_rank{rank}.json").read_text())
        assert len(rows_f) == 8 and [r["step"] for r in rows_f] == [0, 1, 1, 2, 2, 3, 3, 4]
        assert same_rows(rows_f, rows_t)  # per micro-batch: step, sample ids, loss, RNG draws
        ids.append({i for r in rows_f if r["epoch"] == 0 for i in r["ids"]})
        w_t = torch.load(trainer / f"weights_rank{rank}.pt", weights_only=True)
        w_f = torch.load(fabric / f"weights_rank{rank}.pt", weights_only=True)
        assert same_weights(w_f, w_t)
        # The metrics, reduced across ranks the same way (the epoch-end validation after step 3 included).
        m_t = json.loads((trainer / f"metrics_rank{rank}.json").read_text())
        m_f = json.loads((fabric / f"metrics_rank{rank}.json").read_text())
        assert m_f == m_t and any(k.startswith("val/") for k in m_f)
    assert not ids[0] & ids[1]  # within an epoch the ranks train disjoint samples
    assert same_weights(torch.load(fabric / "weights_rank0.pt", weights_only=True),
                        torch.load(fabric / "weights_rank1.pt", weights_only=True))
