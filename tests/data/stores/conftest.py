"""A real ``mooncake_master`` on 127.0.0.1 for the Mooncake store tests.

The fixture fails (never skips) when Mooncake or libibverbs is missing: CI installs
both, so a silent skip would hide a broken environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class MooncakeMaster:
    master_address: str  # "127.0.0.1:P1", the master's RPC endpoint
    metadata_server: str  # "http://127.0.0.1:P2/metadata"
    metrics_url: str
    pid: int
    log_path: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _master_binary() -> Path:
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("Mooncake is not installed: pip install mooncake-transfer-engine-non-cuda==0.3.13.post1")
    try:
        import mooncake.store  # noqa: F401  (loads libibverbs)
    except ImportError as e:
        pytest.fail(f"mooncake.store does not import ({e}); install libibverbs1: apt-get install -y libibverbs1")
    binary = Path(next(iter(spec.submodule_search_locations))) / "mooncake_master"
    if not binary.is_file():
        pytest.fail(f"the Mooncake wheel ships no mooncake_master binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def _ready(rpc: int, http: int, metrics: int) -> bool:
    try:
        for port in (rpc, http):
            socket.create_connection((HOST, port), timeout=0.2).close()
        with urllib.request.urlopen(f"http://{HOST}:{metrics}/health", timeout=1.0) as r:
            return bool(json.loads(r.read()).get("service_ready", True))
    except (OSError, ValueError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mooncake_master(tmp_path_factory: pytest.TempPathFactory):
    """Start mooncake_master on free loopback ports, yield its addresses, SIGTERM it at the end."""
    binary = _master_binary()
    log_dir = tmp_path_factory.mktemp("mooncake_master")
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", HOST)
    last_error = ""
    for attempt in range(3):  # a free port can be taken between probing and binding
        rpc, http, metrics = _free_port(), _free_port(), _free_port()
        log_path = log_dir / f"master{attempt}.log"
        cmd = [
            str(binary),
            f"--rpc_address={HOST}",
            f"--rpc_port={rpc}",
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_host={HOST}",
            f"--http_metadata_server_port={http}",
            f"--metrics_host={HOST}",
            f"--metrics_port={metrics}",
        ]
        with open(log_path, "wb") as log:
            env = {**os.environ, "MC_TCP_BIND_ADDRESS": HOST}
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not _ready(rpc, http, metrics):
            time.sleep(0.1)
        if proc.poll() is None and _ready(rpc, http, metrics):
            break
        _stop(proc)
        last_error = log_path.read_text(errors="replace")[-2000:]
    else:
        pytest.fail(f"mooncake_master did not become ready within {READY_TIMEOUT_S}s; log tail:\n{last_error}")
    try:
        yield MooncakeMaster(
            master_address=f"{HOST}:{rpc}",
            metadata_server=f"http://{HOST}:{http}/metadata",
            metrics_url=f"http://{HOST}:{metrics}",
            pid=proc.pid,
            log_path=log_path,
        )
    finally:
        _stop(proc)
