"""Multi-process resume and metric correctness: gloo DDP on CPU, one process per rank, killed for real.

Each run launches its ranks like torchrun does (LOCAL_RANK, WORLD_SIZE, MASTER_*),
checks every rank's exit code, and reads what each rank trained. Runs are shared
between tests through a module-scoped cache, so the whole file costs ~9 launches.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch

from tests.integration.rank_launch import launch_ranks, logs_tail
from tests.integration.scripts.common import assert_same, make_features, read_rows

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "scripts" / "train.py"


def launch(world: int, out: Path, *args: str, timeout: float = 120) -> list[int]:
    """Run train.py on ``world`` ranks; returns each rank's exit code (every process is gone afterwards)."""
    return launch_ranks(SCRIPT, world, out, "--devices", str(world), "--out", str(out), *args, timeout=timeout)


def _tail(out: Path, world: int) -> str:
    return logs_tail(out, world)


class Runs:
    """Lazily launched runs, each at most once per module."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.features = tmp / "features"
        make_features(self.features)
        self.done: dict[str, tuple[Path, list[int]]] = {}

    def run(self, name: str, world: int, *args: str, root: str | None = None, expect: int | None = 0) -> Path:
        if name not in self.done:
            out = self.tmp / name
            out.mkdir()
            root_dir = self.tmp / (root or name) / "root"
            codes = launch(world, out, "--features", str(self.features), "--root", str(root_dir), *args)
            self.done[name] = (out, codes)
        out, codes = self.done[name]
        if expect is not None:
            assert codes == [expect] * world, f"{name}: exit codes {codes}\n{_tail(out, world)}"
        return out

    @staticmethod
    def rows(out: Path, rank: int) -> list[dict]:
        return read_rows(out / f"rows_rank{rank}.jsonl")

    @staticmethod
    def result(out: Path, rank: int) -> dict:
        return json.loads((out / f"result_rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("ddp"))


def straight_1(runs: Runs) -> Path:
    return runs.run("straight1", 1, "--batch_size", "4", "--validate_first", "--dump_steps", "1,4")


def straight_2(runs: Runs) -> Path:
    return runs.run("straight2", 2, "--batch_size", "2", "--validate_first", "--dump_steps", "1,4")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------ (a) metrics do not depend on the split


def test_count_reduced_metrics_equal_for_1x4_and_2x2(runs):
    one, two = straight_1(runs), straight_2(runs)
    val1 = runs.result(one, 0)["validate_first"]
    for rank in range(2):
        val2 = runs.result(two, rank)["validate_first"]
        # Integer counts summed over ranks, then divided: identical, not just close.
        assert val2["val/acceptance_length"] == val1["val/acceptance_length"]
        assert [val2[f"val/acc_{k}"] for k in range(3)] == [val1[f"val/acc_{k}"] for k in range(3)]
        assert val2["val/loss"] == pytest.approx(val1["val/loss"], rel=1e-6)
    # The first optimizer step sees the same 4 samples, split 2+2 over the ranks.
    rows1 = runs.rows(one, 0)
    rows2 = [runs.rows(two, r) for r in range(2)]
    assert sorted(rows1[0]["ids"]) == sorted(rows2[0][0]["ids"] + rows2[1][0]["ids"])
    # DDP averages the two per-rank means: the same update as one batch of 4, up to rounding.
    w1 = _weights(one / "weights_rank0_step1.pt")
    w2 = _weights(two / "weights_rank0_step1.pt")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ (b) accumulation equals a bigger batch


def test_accumulation_equals_one_big_batch_and_syncs_only_at_the_step(runs):
    two = straight_2(runs)
    acc = runs.run("accum2", 2, "--batch_size", "1", "--accumulate", "2", "--dump_steps", "1,4", "--count_syncs")
    for step in (1, 4):
        for rank in range(2):
            big = _weights(two / f"weights_rank{rank}_step{step}.pt")
            small = _weights(acc / f"weights_rank{rank}_step{step}.pt")
            for k in big:
                torch.testing.assert_close(small[k], big[k], rtol=0, atol=1e-6, msg=f"step {step} {k}")
    for rank in range(2):
        result = runs.result(acc, rank)
        assert result["global_step"] == 12
        syncs = result["syncs"]
        # All-reduces happen only on the second micro-batch of each pair, and on every pair.
        assert syncs and all(n % 2 == 0 for n in syncs), syncs
        assert sorted(set(syncs)) == [2 * s for s in range(1, 13)]


# ------------------------------------------------------------------ (c)+(d) SIGKILL, then resume


def test_sigkill_during_checkpoint_write_then_resume_is_exact_on_1_rank(runs):
    straight = straight_1(runs)
    killed = runs.run(
        "kill1", 1, "--batch_size", "4", "--validate_first", "--kill_during_save_step", "10",
        expect=-signal.SIGKILL,
    )
    ckpt_dir = runs.tmp / "kill1" / "root" / "checkpoints"
    visible = sorted(p.name for p in ckpt_dir.iterdir() if not p.name.startswith("."))
    hidden = [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")]
    assert "step-00000010.ckpt" not in visible and any("step-00000010" in h for h in hidden)
    # Step 5 by cadence, then step 6 on demand: the epoch-end validation there set the first best.
    assert json.loads((ckpt_dir / "last.json").read_text())["step"] == 6
    assert json.loads((ckpt_dir / "best.json").read_text())["step"] == 6
    killed_rows = runs.rows(killed, 0)
    assert killed_rows[-1]["step"] == 10  # it really trained past the checkpoint before dying

    resumed = runs.run("resume1", 1, "--batch_size", "4", "--ckpt_path", "last", root="kill1")
    assert not any(p.name.startswith(".") for p in ckpt_dir.iterdir())  # the torn temp file was cleaned
    rows = runs.rows(resumed, 0)
    assert rows[0]["step"] == 7 and rows[-1]["step"] == 12
    assert_same(rows, runs.rows(straight, 0), upto=6)
    final, expected = _weights(resumed / "weights_rank0.pt"), _weights(straight / "weights_rank0.pt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)  # bit-identical


def test_sigkill_then_resume_is_exact_on_2_ranks(runs):
    straight = straight_2(runs)
    # Saves every 3 steps; killed after step 5, so the resume starts mid-epoch from step 3.
    runs.run("kill2", 2, "--batch_size", "2", "--every_n", "3", "--interrupt_step", "5", "--interrupt_action",
             "SIGKILL", expect=-signal.SIGKILL)
    ckpt_dir = runs.tmp / "kill2" / "root" / "checkpoints"
    assert json.loads((ckpt_dir / "last.json").read_text())["step"] == 3
    resumed = runs.run("resume2", 2, "--batch_size", "2", "--every_n", "3", "--ckpt_path", "last", root="kill2")
    for rank in range(2):
        killed_rows = runs.rows(runs.tmp / "kill2", rank)
        assert [r["step"] for r in killed_rows] == list(range(1, 6))
        assert_same(killed_rows, [r for r in runs.rows(straight, rank) if r["step"] <= 5], upto=0)
        assert_same(runs.rows(resumed, rank), runs.rows(straight, rank), upto=3)
        final, expected = _weights(resumed / f"weights_rank{rank}.pt"), _weights(straight / f"weights_rank{rank}.pt")
        assert all(torch.equal(final[k], expected[k]) for k in expected)
    # The two ranks trained disjoint halves of each global batch.
    r0, r1 = runs.rows(resumed, 0), runs.rows(resumed, 1)
    assert all(not set(a["ids"]) & set(b["ids"]) for a, b in zip(r0, r1))


# ------------------------------------------------------------------ (4)+(e) SIGTERM at an epoch boundary


def sigterm_2(runs: Runs) -> Path:
    # 12 samples per rank in batches of 2: step 6 is the last batch of epoch 0. Only rank 0 is signalled.
    return runs.run("term2", 2, "--batch_size", "2", "--interrupt_step", "6", "--interrupt_action", "SIGTERM",
                    "--interrupt_ranks", "0")


def test_sigterm_on_one_rank_stops_all_cleanly_and_resume_is_exact(runs):
    straight = straight_2(runs)
    stopped = sigterm_2(runs)
    for rank in range(2):
        assert runs.result(stopped, rank)["preempted_at"] == 6
        assert runs.result(stopped, rank)["global_step"] == 6
        assert [r["step"] for r in runs.rows(stopped, rank)] == list(range(1, 7))
    ckpt_dir = runs.tmp / "term2" / "root" / "checkpoints"
    assert json.loads((ckpt_dir / "last.json").read_text()) == {"step": 6, "path": "step-00000006.ckpt"}
    resumed = runs.run("resume_term2", 2, "--batch_size", "2", "--ckpt_path", "last", root="term2")
    for rank in range(2):
        rows = runs.rows(resumed, rank)
        assert rows[0]["step"] == 7 and rows[0]["epoch"] == 1 and rows[0]["batch_index"] == 0
        assert_same(rows, runs.rows(straight, rank), upto=6)
        final, expected = _weights(resumed / f"weights_rank{rank}.pt"), _weights(straight / f"weights_rank{rank}.pt")
        assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_resume_on_a_different_world_size_is_refused_naming_it(runs):
    sigterm_2(runs)
    out = runs.run("term2_on_1", 1, "--batch_size", "2", "--ckpt_path", "last", root="term2", expect=1)
    text = (out / "stdout_rank0.txt").read_text()
    assert "ResumeMismatchError" in text and "world_size: checkpoint 2, this run 1" in text
    assert re.search(r"cannot resume from \S+/term2/root/checkpoints/step-\d{8}\.ckpt", text)  # names the file
    assert not (out / "rows_rank0.jsonl").exists()  # refused before a single step
