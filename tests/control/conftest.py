"""A real redis-server on 127.0.0.1 for the Redis ledger tests (never mocked).

Debian's redis-server (scripts/setup.sh installs it) runs on a free port with its
append-only file in a temporary folder and is stopped by its process id. Without
the binary or the redis client the tests skip locally and FAIL under CI=true.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_redis() -> str:
    """The redis-server binary; a missing dependency skips, or fails under CI=true."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    missing = None
    if binary is None:
        missing = "redis-server is not installed (apt-get install -y redis-server, or scripts/setup.sh)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            missing = "the redis client is not installed (.venv/bin/pip install -c constraints.txt redis)"
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    return binary


class RedisServer:
    """One redis-server process with AOF on; ``kill``/``start`` restart it on the same port and folder."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary, self.folder, self.port = binary, folder, _free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, stream: str | None = None, **query: str) -> str:
        stream = stream or f"t{uuid.uuid4().hex[:10]}"
        extra = "".join(f"&{k}={v}" for k, v in query.items())
        return f"redis://127.0.0.1:{self.port}/0?stream={stream}{extra}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.folder), "--maxmemory-policy", "noeviction",
             "--daemonize", "no", "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.folder / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on 127.0.0.1:{self.port} did not answer within {START_TIMEOUT_S} s")

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, only what the append-only file already holds survives."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One server for the session; every test uses its own stream name."""
    server = RedisServer(require_redis(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path):
    """A server of this test's own, to restart or kill."""
    server = RedisServer(require_redis(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()
