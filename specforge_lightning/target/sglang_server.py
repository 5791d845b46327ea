"""An SGLang capture server: how we launch one, wait for it, stop it, and check one we were given.

A capture server is a stock ``sglang.launch_server`` with SGLang's own aux capture on
(``--enable-return-aux-hidden-states``, the EAGLE3 convention: layer ``i`` is read at the
input of layer ``i + 1``), eager forwards, one whole prefill per request, and our hook
(``target/sglang_hook.py``) on ``logits_processor`` writing features into a FeatureStore.
:func:`server_problems` names every way a running server differs from that, so a server
without our hooks (or with other layers) is refused before any capture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from specforge_lightning.errors import UserError
from specforge_lightning.target.sglang_hook import HOOK_FACTORY, HOOK_TARGET

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding specforge_lightning/
DEFAULT_PYTHON = ".venv-sglang/bin/python"
SETUP_HINT = "bash scripts/setup-sglang.sh builds it"

# Flags a capture needs, as ``get_server_info`` reports them: (field, wanted value, the flag that sets it).
REQUIRED_FLAGS = (
    ("enable_return_aux_hidden_states", True, "--enable-return-aux-hidden-states --speculative-algorithm EAGLE3"),
    ("disable_radix_cache", True, "--disable-radix-cache"),
    ("chunked_prefill_size", -1, "--chunked-prefill-size -1"),
    ("disable_cuda_graph", True, "--disable-cuda-graph (hooks fire on the eager path only)"),
    ("disable_overlap_schedule", True, "--disable-overlap-schedule"),
    ("pp_size", 1, "--pp-size 1"),
)


class SGLangConfigError(UserError, ValueError):
    """The SGLang engine cannot be used as configured (no side venv, a server without our hooks, bad layers)."""


def side_python(path: str | os.PathLike) -> Path:
    """The side venv's interpreter (relative paths are read from the project root); refused when missing."""
    python = Path(path).expanduser()
    if not python.is_absolute() and not python.exists():
        python = PACKAGE_ROOT / python
    if not python.exists():
        raise SGLangConfigError(
            f"data.prepare.sglang_python: {python} does not exist, so no SGLang server can be launched; "
            f"{SETUP_HINT}, or set sglang_python to an interpreter with sglang installed, or sglang_url to a running server"
        )
    return python


def capture_problem(layer_ids: Sequence[int], num_layers: int) -> str | None:
    """Why SGLang cannot capture ``layer_ids`` of a ``num_layers`` target (None when it can)."""
    bad = sorted({int(i) for i in layer_ids if not 0 <= int(i) < num_layers - 1})
    if not bad:
        return None
    return (
        f"layer ids {bad} cannot be captured by SGLang for a target of {num_layers} layers: it reads layer i at the "
        f"input of layer i+1, so the ids must lie in 0..{num_layers - 2}; choose other data.prepare.layer_ids or use engine: hf"
    )


def side_env(python: Path, device: str) -> dict[str, str]:
    """The server's environment: our package importable (for the hook); on CPU, the stub libcuda and CPU engine."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        stub = python.parent.parent / "lib" / "stub"
        if stub.is_dir() and not _has_libcuda():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(stub), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def _has_libcuda() -> bool:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "libcuda.so.1" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_args(
    target_dir: str | Path,
    layer_ids: Sequence[int],
    hook: Mapping[str, Any],
    *,
    dtype: str,
    port: int,
    device: str = "cpu",
    extra: Sequence[str] = (),
) -> list[str]:
    """``sglang.launch_server`` arguments for a capture server (``dtype`` explicit: ``auto`` maps fp32 to fp16)."""
    args = [
        "-m", "sglang.launch_server", "--model-path", str(target_dir), "--device", device,
        "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), "--skip-server-warmup",
        "--disable-cuda-graph", "--disable-radix-cache", "--chunked-prefill-size", "-1",
        "--disable-overlap-schedule", "--enable-return-aux-hidden-states", "--speculative-algorithm", "EAGLE3",
        "--return-aux-hidden-state-layer-ids", *[str(i) for i in sorted(set(layer_ids))],
        "--forward-hooks", json.dumps([dict(hook)]),
    ]
    if device == "cpu":
        # SGLang's default CPU backend (intel_amx) needs the AMX build of sgl-kernel; the PyPI wheel is not.
        args += ["--attention-backend", "torch_native", "--mem-fraction-static", "0.05", "--max-total-tokens", "4096"]
    return args + list(extra)


def http_json(url: str, payload: Any = None, timeout: float = 600.0) -> Any:
    """GET (no payload) or POST JSON to ``url``; the decoded reply."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return json.loads(reply.read() or b"null")


class ServerProcess:
    """A server we launched: its own process group, its log file, stopped by its process id."""

    def __init__(self, python: Path, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(python), *args], env=dict(env), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self.proc.pid

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line[:400] for line in text[-lines:])

    def wait_ready(self, url: str, timeout_s: float) -> None:
        """Until ``/health`` answers; a server that exits or stays silent is an error quoting its log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SGLangConfigError(
                    f"the SGLang server (pid {self.pid}) exited with code {self.proc.returncode} before it was ready; "
                    f"its log {self.log_path} ends:\n{self.log_tail()}"
                )
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise SGLangConfigError(
            f"the SGLang server (pid {self.pid}) was not ready after {timeout_s:.0f} s; its log {self.log_path} ends:\n"
            f"{self.log_tail()}"
        )

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's process group (scheduler and detokenizer included), SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.pid, sig)  # the group is the server's own: start_new_session=True
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children that outlived the leader
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


def our_hook(info: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The server's entry of our capture hook (None when it carries none)."""
    for spec in info.get("forward_hooks") or []:
        if spec.get("hook_factory") == HOOK_FACTORY and HOOK_TARGET in (spec.get("target_modules") or []):
            return spec
    return None


def server_problems(
    info: Mapping[str, Any],
    *,
    layer_ids: Sequence[int],
    target_dir: str | Path,
    dtype: str,
    capture_dtype: str,
) -> list[str]:
    """Every way the server described by ``get_server_info`` cannot serve this capture (empty: it can)."""
    problems = []
    hook = our_hook(info)
    if hook is None:
        names = [s.get("hook_factory") for s in info.get("forward_hooks") or []]
        problems.append(f"it carries no specforge capture hook (forward_hooks: {names or 'none'}; want {HOOK_FACTORY})")
    else:
        config = hook.get("config") or {}
        missing = sorted(set(int(i) for i in layer_ids) - set(config.get("layer_ids") or []))
        if missing:
            problems.append(f"its hook captures layers {config.get('layer_ids')}, this run needs {sorted(set(layer_ids))} "
                            f"(missing {missing})")
        if config.get("layer_ids") != info.get("return_aux_hidden_state_layer_ids"):
            problems.append(f"its hook's layer ids {config.get('layer_ids')} differ from --return-aux-hidden-state-layer-ids "
                            f"{info.get('return_aux_hidden_state_layer_ids')}")
        if config.get("capture_dtype") != capture_dtype:
            problems.append(f"its hook writes {config.get('capture_dtype')}, this run captures {capture_dtype}")
    for name, want, flag in REQUIRED_FLAGS:
        if info.get(name) != want:
            problems.append(f"{name} is {info.get(name)!r}, capture needs {want!r} ({flag})")
    if info.get("aux_hidden_state_capture") not in (None, "eagle3"):
        problems.append(f"aux_hidden_state_capture is {info.get('aux_hidden_state_capture')!r}; use --speculative-algorithm EAGLE3")
    if info.get("dtype") != dtype:
        problems.append(f"it computes in {info.get('dtype')!r}, this run's compute_dtype is {dtype!r} (--dtype {dtype})")
    served = str(info.get("model_path", ""))
    if served and Path(served).expanduser().resolve() != Path(target_dir).resolve():
        problems.append(f"it serves {served}, this run's target is {target_dir}")
    return problems
