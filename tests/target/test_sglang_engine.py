"""SGLangTargetEngine against HFTargetEngine, with a REAL SGLang server on CPU (the side venv .venv-sglang).

One capture server (tiny Llama, fp32, ``--device cpu``, torch-native attention, no CUDA graphs,
no radix cache, one-chunk prefill, no overlap schedule) serves the whole module; a second one,
started WITHOUT our hook, must be refused. Both are stopped by their process id whatever the
outcome. Without the side venv the module is skipped, except under ``CI=true``, where that fails
(``bash scripts/setup-sglang.sh`` builds it). Tolerance: fp32 on both sides, ``TOL`` absolute.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_lightning.contracts import PromptTask
from specforge_lightning.data.stores.spec import StoreSpec
from specforge_lightning.target.engine import HFTargetEngine
from specforge_lightning.target.prepare import prepare
from specforge_lightning.target.prepare_config import PrepareConfig, PrepareConfigError
from specforge_lightning.target.sglang_engine import SGLangTargetEngine, check_engine_config
from specforge_lightning.target.sglang_server import (
    PACKAGE_ROOT,
    ServerProcess,
    SGLangConfigError,
    free_port,
    side_env,
)
from specforge_lightning.target.zoo import resolve_target
from tests.integration.conftest import fit, tiny_prepare

SIDE_PYTHON = PACKAGE_ROOT / ".venv-sglang" / "bin" / "python"
TOL = 1e-5  # fp32: SGLang's RMSNorm / rotary / attention CPU paths differ from HF's in op order only
SERVER_LAYERS = [1, 3, 4, 6]  # the eagle3 preset of the 8-layer tiny Llama ([1, 3, 4]) plus one near the top


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -------------------------------------------------------------------- no server needed


def test_engine_field_is_checked_when_the_config_is_made():
    with pytest.raises(PrepareConfigError, match="data.prepare.engine must be 'hf' or 'sglang'"):
        PrepareConfig(engine="vllm")
    with pytest.raises(PrepareConfigError, match="does not regenerate"):
        PrepareConfig(engine="sglang", regenerate=True)
    with pytest.raises(PrepareConfigError, match="sglang_url needs engine: sglang"):
        PrepareConfig(sglang_url="http://127.0.0.1:1")


def test_missing_side_venv_and_uncapturable_layers_fail_before_work(tmp_path):
    cfg = tiny_prepare(tmp_path / "f", engine="sglang", sglang_python=str(tmp_path / "nope" / "python"))
    with pytest.raises(SGLangConfigError, match=r"data.prepare.sglang_python: .*nope/python does not exist.*setup-sglang"):
        prepare(cfg, progress=False)
    assert not (tmp_path / "f" / "manifest.json").exists()  # refused before any work
    with pytest.raises(SGLangConfigError, match=r"layer ids \[7\] cannot be captured by SGLang .* 0\.\.6"):
        check_engine_config(replace(cfg, layer_ids=[1, 7]), 8, [1, 7])


# -------------------------------------------------------------------- real servers


def _need_side_venv() -> None:
    if not SIDE_PYTHON.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{SIDE_PYTHON} is missing under CI=true: run bash scripts/setup-sglang.sh", pytrace=False)
        pytest.skip("no side venv .venv-sglang (bash scripts/setup-sglang.sh)")


def _plain_server(target: Path, log: Path) -> tuple[ServerProcess, str]:
    """A stock CPU server WITHOUT our hook (the one a capture must refuse)."""
    port = free_port()
    args = [
        "-m", "sglang.launch_server", "--model-path", str(target), "--device", "cpu", "--dtype", "float32",
        "--attention-backend", "torch_native", "--disable-cuda-graph", "--disable-radix-cache",
        "--chunked-prefill-size", "-1", "--disable-overlap-schedule", "--skip-server-warmup",
        "--mem-fraction-static", "0.05", "--max-total-tokens", "4096", "--host", "127.0.0.1", "--port", str(port),
    ]
    return ServerProcess(SIDE_PYTHON, args, side_env(SIDE_PYTHON, "cpu"), log), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers():
    """(capture engine with its launched server, URL of a hookless server); both started at once."""
    _need_side_venv()
    target = resolve_target("tiny-llama")
    logdir = Path(tempfile.mkdtemp(prefix="sfl-sglang-test-"))
    plain, plain_url = _plain_server(target, logdir / "plain.log")
    engine = None
    try:
        engine = SGLangTargetEngine.launch(target, SERVER_LAYERS, dtype="float32", capture_dtype="float32")
        plain.wait_ready(plain_url, 300)
        yield engine, plain_url
    finally:
        pids = [plain.pid] + ([engine.server.pid] if engine is not None and engine.server else [])
        plain.stop()
        if engine is not None:
            engine.close()
        shutil.rmtree(logdir, ignore_errors=True)
        assert not any(_alive(p) for p in pids), f"a server outlived the tests: {pids}"


@pytest.fixture(scope="module")
def hf():
    return HFTargetEngine.from_path(str(resolve_target("tiny-llama")), dtype=torch.float32)


def _tasks() -> list[PromptTask]:
    g = torch.Generator().manual_seed(3)
    out = []
    for k, n in enumerate((5, 17, 9, 33)):
        ids = tuple(int(i) for i in torch.randint(3, 500, (n,), generator=g))
        mask = tuple(int(j >= n // 3) for j in range(n))
        out.append(PromptTask(f"t{k}", ids, mask))
    return out


def test_capture_equals_hf(servers, hf):
    engine, _ = servers
    tasks = _tasks()
    layers = [6, 1, 3]  # any order, a subset of the server's, one near the top
    ours, ref = engine.capture(tasks, layers), hf.capture(tasks, layers)
    worst = 0.0
    for a, b in zip(ours, ref):
        assert a.keys() == b.keys()
        for k in b:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
            if b[k].is_floating_point():
                worst = max(worst, (a[k] - b[k]).abs().max().item())
            else:
                assert torch.equal(a[k], b[k]), k
    assert worst <= TOL, worst
    print(f"max abs difference SGLang vs HF (fp32): {worst:.3g}")
    assert not list((Path(engine.store_spec.root) / "samples").iterdir())  # read features are freed


def test_url_mode_accepts_our_server_and_refuses_other_layers(servers):
    engine, _ = servers
    target = resolve_target("tiny-llama")
    other = SGLangTargetEngine.connect(engine.url, target, [1, 4], dtype="float32", capture_dtype="float32")
    try:
        assert other.server is None and other.server_layer_ids == SERVER_LAYERS
        assert other.capture(_tasks()[:1], [4])[0]["aux_hidden_states"].shape == (5, 64)
    finally:
        other.close()
    assert engine.server is not None and _alive(engine.server.pid)  # closing a connected engine stops nothing
    with pytest.raises(SGLangConfigError, match=r"captures layers \[1, 3, 4, 6\], this run needs \[2, 3\] \(missing \[2\]\)"):
        SGLangTargetEngine.connect(engine.url, target, [2, 3], dtype="float32", capture_dtype="float32")
    with pytest.raises(SGLangConfigError, match="this run captures bfloat16.*compute_dtype is 'bfloat16'"):
        SGLangTargetEngine.connect(engine.url, target, [1], dtype="bfloat16", capture_dtype="bfloat16")


def test_a_server_without_our_hooks_is_refused(servers):
    _, plain_url = servers
    with pytest.raises(SGLangConfigError) as err:
        SGLangTargetEngine.connect(plain_url, resolve_target("tiny-llama"), [1, 3], dtype="float32",
                                   capture_dtype="float32")
    text = str(err.value)
    assert "carries no specforge capture hook" in text and "enable_return_aux_hidden_states" in text


def test_prepare_with_sglang_equals_hf_and_a_fit_on_a_produced_stream_matches(servers, tmp_path):
    """prepare (offline) and produce (disaggregated, shared directory) through the server's URL."""
    from specforge_lightning.datamodules import FeatureDataModule, StreamDataModule
    from specforge_lightning.target.producer import ProducerConfig, run_producer

    engine, _ = servers
    hf_cfg = tiny_prepare(tmp_path / "hf")
    sg_cfg = tiny_prepare(tmp_path / "sg", engine="sglang", sglang_url=engine.url)
    hf_manifest, sg_manifest = prepare(hf_cfg, progress=False), prepare(sg_cfg, progress=False)
    assert sg_manifest["splits"] == hf_manifest["splits"] and sg_manifest["layer_ids"] == [1, 3, 4]
    for rel in hf_manifest["splits"]["train"]["shards"]:
        a, b = load_file(tmp_path / "sg" / rel), load_file(tmp_path / "hf" / rel)
        assert a.keys() == b.keys()
        for k in b:
            assert a[k].dtype == b[k].dtype and torch.allclose(a[k], b[k], atol=TOL, rtol=0), (rel, k)

    producer = ProducerConfig(prepare=replace(sg_cfg, output_dir=str(tmp_path / "unused")),
                              ledger=str(tmp_path / "stream" / "ledger.sqlite"),
                              store=StoreSpec(kind="shared_dir", root=str(tmp_path / "store")))
    assert run_producer(producer)["complete"]
    streamed, _ = fit(StreamDataModule(source="ledger", prepare=producer.prepare, batch_size=2,
                                       ledger=producer.ledger, store=producer.store))
    offline, _ = fit(FeatureDataModule(prepare=hf_cfg, batch_size=2, shuffle=False, prefetch=0))
    assert streamed.ids == offline.ids and len(offline.losses) == 4
    assert torch.allclose(torch.tensor(streamed.losses), torch.tensor(offline.losses), atol=1e-4, rtol=0), (
        streamed.losses, offline.losses)
