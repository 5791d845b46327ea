"""SGLangTargetEngine: the TargetEngine contract of ``HFTargetEngine``, computed by an SGLang server.

Two process models. :meth:`SGLangTargetEngine.launch` starts ``sglang.launch_server`` with
the side venv's interpreter (``data.prepare.sglang_python``), waits for it and stops it by
its process id on :meth:`close`. :meth:`SGLangTargetEngine.connect` takes the URL of a
running server and refuses it, naming each difference, unless it carries our capture hook
with the layers and flags a capture needs (``sglang_server.server_problems``).

Tensors never travel as JSON: the hook inside the server puts each request's features
into a FeatureStore (a shared directory of safetensors, or Mooncake) under the request id;
the engine reads them back, adds ``loss_mask``, keeps ``target_top1`` only where the
previous position is supervised (as HF does) and frees them. :func:`open_engine` is where
prepare, the producer and the colocated source pick their engine (``data.prepare.engine``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.contracts import FeatureSpec, PromptTask, SampleRef
from specforge_lightning.data.stores.base import FeatureStore, FeatureStoreError
from specforge_lightning.data.stores.shared_dir import SharedDirFeatureStore
from specforge_lightning.data.stores.spec import StoreSpec, build_store
from specforge_lightning.target.engine import HFTargetEngine, TargetEngine
from specforge_lightning.target.sglang_hook import RID_PREFIX, hook_spec
from specforge_lightning.target.sglang_server import (
    DEFAULT_PYTHON,
    ServerProcess,
    SGLangConfigError,
    capture_problem,
    free_port,
    http_json,
    launch_args,
    our_hook,
    server_problems,
    side_env,
    side_python,
)

class SGLangTargetEngine:
    """Captures through an SGLang server whose hook writes into ``store``; same samples as HFTargetEngine."""

    def __init__(
        self,
        url: str,
        store_spec: StoreSpec,
        *,
        layer_ids: Sequence[int],
        num_layers: int,
        hidden_size: int,
        capture_dtype: str,
        server: ServerProcess | None = None,
        owned_dir: Path | None = None,
        request_timeout_s: float = 600.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.server_layer_ids = sorted(set(int(i) for i in layer_ids))
        self.capture_dtype = capture_dtype
        self.server = server
        self.store_spec = store_spec
        self._owned_dir = owned_dir
        self._timeout = request_timeout_s
        self._store: FeatureStore = build_store(store_spec, consume_once=True)
        self._batch = 0

    # -------------------------------------------------------------- construction
    @classmethod
    def launch(
        cls,
        target_dir: str | Path,
        layer_ids: Sequence[int],
        *,
        dtype: str = "float32",
        capture_dtype: str = "float32",
        python: str | Path = DEFAULT_PYTHON,
        store: StoreSpec | None = None,
        device: str = "cpu",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 300.0,
    ) -> SGLangTargetEngine:
        """Start a capture server for ``target_dir`` (a shared temp folder as the store unless ``store`` names one)."""
        num_layers, hidden, vocab = _shape_of(target_dir)
        problem = capture_problem(layer_ids, num_layers)
        if problem:
            raise SGLangConfigError(problem)
        interpreter = side_python(python)
        owned = None
        if store is None:
            owned = Path(tempfile.mkdtemp(prefix="sfl-sglang-"))
            store = StoreSpec(kind="shared_dir", root=str(owned / "store"))
        hook = hook_spec(layer_ids, _hook_store(store), capture_dtype=capture_dtype, vocab_size=vocab)
        port = port or free_port()
        log_dir = owned or Path(tempfile.mkdtemp(prefix="sfl-sglang-log-"))
        args = launch_args(target_dir, layer_ids, hook, dtype=dtype, port=port, device=device, extra=extra_args)
        server = ServerProcess(interpreter, args, side_env(interpreter, device), log_dir / "server.log")
        url = f"http://127.0.0.1:{port}"
        try:
            server.wait_ready(url, startup_timeout_s)
            engine = cls(url, store, layer_ids=layer_ids, num_layers=num_layers, hidden_size=hidden,
                         capture_dtype=capture_dtype, server=server, owned_dir=owned)
        except BaseException:
            server.stop()
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        return engine

    @classmethod
    def connect(
        cls,
        url: str,
        target_dir: str | Path,
        layer_ids: Sequence[int],
        *,
        dtype: str = "float32",
        capture_dtype: str = "float32",
        store: StoreSpec | None = None,
    ) -> SGLangTargetEngine:
        """Use a running server; refused (every difference named) unless it can serve this capture."""
        url = url.rstrip("/")
        num_layers, hidden, _ = _shape_of(target_dir)
        problem = capture_problem(layer_ids, num_layers)
        if problem:
            raise SGLangConfigError(problem)
        try:
            info = http_json(f"{url}/get_server_info", timeout=30)
        except OSError as e:
            raise SGLangConfigError(f"data.prepare.sglang_url: no SGLang server answers at {url} ({e})") from None
        problems = server_problems(info, layer_ids=layer_ids, target_dir=target_dir, dtype=dtype,
                                   capture_dtype=capture_dtype)
        hook = our_hook(info)
        served = StoreSpec(**hook["config"]["store"]) if hook else None
        if served is not None and store is not None and _hook_store(store) != _hook_store(served):
            problems.append(f"its hook writes into store {_hook_store(served)}, this run reads {_hook_store(store)}")
        if problems:
            raise SGLangConfigError(
                f"the SGLang server at {url} cannot capture for this run: " + "; ".join(problems)
                + ". Restart it with the flags and --forward-hooks of sglang_server.launch_args, or leave "
                "data.prepare.sglang_url unset to let the run launch its own"
            )
        return cls(url, store or served, layer_ids=hook["config"]["layer_ids"], num_layers=num_layers,
                   hidden_size=hidden, capture_dtype=capture_dtype)

    # -------------------------------------------------------------- capture
    @torch.no_grad()
    def capture(self, tasks: Sequence[PromptTask], layer_ids: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        if not tasks:
            return []
        bad = [i for i in layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer ids {bad} are outside the target's {self.num_layers} layers")
        missing = [i for i in layer_ids if i not in self.server_layer_ids]
        if missing:
            raise SGLangConfigError(
                f"layer ids {missing} are not captured by the SGLang server at {self.url} (it captures "
                f"{self.server_layer_ids}); launch it with these layer ids"
            )
        self._batch += 1
        rids = [f"{RID_PREFIX}{uuid.uuid4().hex[:12]}-{self._batch}-{k}" for k in range(len(tasks))]
        payload = {
            "input_ids": [list(t.input_ids) for t in tasks],
            "rid": rids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        }
        try:
            http_json(f"{self.url}/generate", payload, timeout=self._timeout)
        except OSError as e:
            raise FeatureStoreError(f"the SGLang server at {self.url} failed a capture request: {e}{self._log()}") from e
        H = self.hidden_size
        columns = [self.server_layer_ids.index(i) for i in layer_ids]
        return [self._sample(rid, task, columns, H) for rid, task in zip(rids, tasks)]

    def _sample(self, rid: str, task: PromptTask, columns: list[int], H: int) -> dict[str, torch.Tensor]:
        raw = self._read(rid, task.num_tokens)
        ids = torch.tensor(task.input_ids, dtype=torch.long)
        if not torch.equal(raw["input_ids"], ids):
            raise FeatureStoreError(f"the server captured other tokens for request {rid} than were sent")
        aux = raw["aux_hidden_states"].view(task.num_tokens, -1, H)[:, columns].reshape(task.num_tokens, -1)
        wanted = torch.zeros(task.num_tokens, dtype=torch.bool)
        wanted[1:] = torch.tensor(task.loss_mask[:-1], dtype=torch.bool)
        top1 = torch.where(wanted, raw["target_top1"], torch.full_like(raw["target_top1"], -1))
        return {
            "input_ids": ids,
            "loss_mask": torch.tensor(task.loss_mask, dtype=torch.long),
            "aux_hidden_states": aux.contiguous(),
            "last_hidden_state": raw["last_hidden_state"],
            "target_top1": top1,
        }

    def _read(self, rid: str, n: int) -> dict[str, torch.Tensor]:
        """The hook's tensors for request ``rid``, freed from the store once read."""
        dtype = self.capture_dtype
        specs = (
            FeatureSpec("aux_hidden_states", (n, len(self.server_layer_ids) * self.hidden_size), dtype),
            FeatureSpec("input_ids", (n,), "int64"),
            FeatureSpec("last_hidden_state", (n, self.hidden_size), dtype),
            FeatureSpec("target_top1", (n,), "int64"),
        )
        keys = {s.name: s.name for s in specs}
        if isinstance(self._store, SharedDirFeatureStore):
            generation = self._store.latest_generation(rid)
            uri = f"dir://{self._store.sample_path(rid, generation)}"
        else:  # Mooncake: a fresh request id is at generation 0, one object per feature
            generation, uri = 0, f"mooncake://{rid}"
            keys = {s.name: self._store.key(rid, 0, s.name) for s in specs}
        ref = SampleRef(sample_id=rid, store_uri=uri, feature_keys=keys, feature_specs=specs, generation=generation)
        try:
            tensors, lease = self._store.get(ref)
        except FeatureStoreError as e:
            raise FeatureStoreError(
                f"the SGLang server at {self.url} wrote no features for request {rid} into store "
                f"{_hook_store(self.store_spec)} ({e}); is that store visible from both sides?{self._log()}"
            ) from e
        self._store.release(lease)
        if isinstance(self._store, SharedDirFeatureStore):  # the per-id counter file (ids are never reused)
            (self._store.generations_dir / rid).unlink(missing_ok=True)
        return tensors

    def _log(self) -> str:
        return f"\nthe server log {self.server.log_path} ends:\n{self.server.log_tail()}" if self.server else ""

    # -------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the server we launched (by its process id) and remove our exchange folder; idempotent."""
        try:
            self._store.close()
        finally:
            if self.server is not None:
                self.server.stop()
                self.server = None
            if self._owned_dir is not None:
                shutil.rmtree(self._owned_dir, ignore_errors=True)
                self._owned_dir = None

    def __enter__(self) -> SGLangTargetEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hook_store(spec: StoreSpec) -> dict[str, Any]:
    """The store fields the hook needs; secrets stay out (a token travels by ``token_env`` only)."""
    fields = asdict(spec)
    fields.pop("token", None)
    if fields.get("root"):
        fields["root"] = str(Path(fields["root"]).resolve())
    return fields


def _shape_of(target_dir: str | Path) -> tuple[int, int, int]:
    """(layers, hidden size, vocab size) from the target's config.json, without loading transformers."""
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["vocab_size"])


def check_engine_config(cfg: Any, num_layers: int, layer_ids: Sequence[int]) -> None:
    """Refuse an SGLang engine config before any work: no side venv, or layers SGLang cannot capture."""
    if getattr(cfg, "engine", "hf") != "sglang":
        return
    problem = capture_problem(layer_ids, num_layers)
    if problem:
        raise SGLangConfigError(f"data.prepare.engine=sglang: {problem}")
    if not cfg.sglang_url:
        side_python(cfg.sglang_python)


def open_engine(cfg: Any, target_dir: str | Path, layer_ids: Sequence[int]) -> TargetEngine:
    """The target engine ``cfg`` (a PrepareConfig) names: ``engine: hf`` (in-process) or ``sglang``."""
    if getattr(cfg, "engine", "hf") == "hf":
        return HFTargetEngine.from_path(
            str(target_dir), dtype=getattr(torch, cfg.compute_dtype), capture_dtype=getattr(torch, cfg.capture_dtype)
        )
    if cfg.sglang_url:
        return SGLangTargetEngine.connect(cfg.sglang_url, target_dir, layer_ids, dtype=cfg.compute_dtype,
                                          capture_dtype=cfg.capture_dtype)
    return SGLangTargetEngine.launch(target_dir, layer_ids, dtype=cfg.compute_dtype, capture_dtype=cfg.capture_dtype,
                                     python=cfg.sglang_python)


def close_engine(engine: object) -> None:
    """Close an engine that holds a server (HFTargetEngine holds nothing to close)."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()

