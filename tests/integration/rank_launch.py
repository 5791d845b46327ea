"""Launching gloo DDP ranks of one script, one process per rank, like torchrun does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import REPO, child_env, free_port


def run_ranks(cmd: list[str], *, world: int = 2, set_rank: bool = True, timeout: float = 150) -> None:
    """Run ``cmd`` on ``world`` ranks (``RANK`` set too unless ``set_rank`` is false) and assert each exits 0."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                          NODE_RANK="0", **({"RANK": str(r)} if set_rank else {})),
        )
        for r in range(world)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{text[-3000:]}"


def run_two_ranks(script: Path, args: str, out: Path, timeout: float = 150) -> list[dict]:
    """Run ``script args`` on ranks 0 and 1, assert each exits 0, and return each rank's ``rank{r}.json``."""
    run_ranks([sys.executable, str(script), args], timeout=timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def launch_ranks(script: Path, world: int, out: Path, *args: str, timeout: float) -> list[int]:
    """``script *args`` on ``world`` ranks, each logging to ``out/stdout_rank{r}.txt``; each rank's exit code
    (every process is gone afterwards)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
            "LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        }
        log = open(out / f"stdout_rank{rank}.txt", "w")
        cmd = [sys.executable, str(script), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def logs_tail(out: Path, world: int) -> str:
    return "\n".join(f"--- rank {r}:\n" + (out / f"stdout_rank{r}.txt").read_text()[-3000:] for r in range(world))
