"""A user's mistake through the command line: one line `error: <message>` naming the thing, exit 2, nothing changed.

Also: prepare repairs a damaged feature folder (a deleted or truncated shard) and says so.
Each case runs `python -m specforge_lightning ...` in a fresh interpreter on the tiny target.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from specforge_lightning.control.producer import claim_store_root
from specforge_lightning.data.stores.shards import read_shard_index
from specforge_lightning.target.prepare import prepare
from tests.integration.conftest import REPO, tiny_prepare

SKIP = ("output_dir", "layer_ids", "regenerate_samples", "max_messages", "cache_dir", "no_repair")


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SPECFORGE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "specforge_lightning", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def _flags(cfg) -> list[str]:
    return [f"--{k}={v}" for k, v in asdict(cfg).items() if k not in SKIP and v is not None]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = tiny_prepare(tmp_path_factory.mktemp("feats") / "f", num_val_samples=2)
    manifest = prepare(cfg, progress=False)
    return cfg, manifest


def test_prepare_repairs_deleted_and_truncated_shards_and_says_so(prepared, tmp_path):
    cfg, manifest = prepared
    out = tmp_path / "f"
    shutil.copytree(cfg.output_dir, out)
    train = manifest["splits"]["train"]["shards"]
    (out / train[0]).unlink()
    data = (out / train[1]).read_bytes()
    (out / train[1]).write_bytes(data[: len(data) - 64])
    kept = {k: v for k, v in _hashes(out).items() if k in train[2:]}
    proc = _cli("prepare", f"--output_dir={out}", *_flags(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"repaired shards: {sorted(train[:2])}" in proc.stdout
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["repaired_shards"] == sorted(train[:2]) and on_disk["complete"]
    assert {k: v for k, v in _hashes(out).items() if k in train[2:]} == kept  # good shards untouched
    for rel in train[:2]:  # the same samples again
        assert [r.sample_id for r in read_shard_index(out / rel)] == [
            r.sample_id for r in read_shard_index(Path(cfg.output_dir) / rel)
        ]

    (out / train[0]).unlink()
    before = _hashes(out)
    refused = _cli("prepare", f"--output_dir={out}", "--no_repair=true", *_flags(cfg))
    line = _one_line_error(refused)
    assert train[0] in line and "missing" in line and "nothing was changed" in line
    assert _hashes(out) == before


def test_prepare_into_a_folder_prepared_differently_is_one_line_and_changes_nothing(prepared):
    cfg, _ = prepared
    before = _hashes(Path(cfg.output_dir))
    proc = _cli("prepare", f"--output_dir={cfg.output_dir}", *_flags(cfg), "--max_length=32")
    line = _one_line_error(proc)
    assert "holds features prepared differently (max_length: prepared 40, requested 32)" in line
    assert "use another output_dir" in line
    assert _hashes(Path(cfg.output_dir)) == before


def test_negative_num_samples_is_refused_naming_the_field(tmp_path):
    proc = _cli("prepare", f"--output_dir={tmp_path / 'f'}", "--target=tiny-llama", "--num_samples=-5")
    assert _one_line_error(proc) == "error: data.prepare.num_samples must be an integer >= 1, got -5"
    assert not (tmp_path / "f").exists()


def test_a_target_folder_with_only_config_json_names_what_is_missing(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    proc = _cli("prepare", f"--output_dir={tmp_path / 'f'}", f"--target={target}", "--num_samples=2")
    line = _one_line_error(proc)
    assert str(target) in line and "tokenizer files" in line and "weights (*.safetensors)" in line
    assert "config.json" in line


def test_a_corpus_of_lone_user_turns_says_why_nothing_is_usable(tmp_path):
    corpus = tmp_path / "users.jsonl"
    corpus.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(28)))
    proc = _cli(
        "prepare", f"--output_dir={tmp_path / 'f'}", "--target=tiny-llama", f"--corpus={corpus}",
        "--num_samples=20", "--num_val_samples=8", "--layer_preset=eagle3",
    )
    line = _one_line_error(proc)
    assert "gave only 0 usable conversations, 28 requested" in line and "28 had no assistant turn" in line


def test_a_second_producer_with_another_ledger_on_the_same_store_root_is_refused(tmp_path):
    root = tmp_path / "store"
    first = tmp_path / "a" / "ledger.sqlite"
    owner = claim_store_root(root, first)
    (root / "samples").mkdir()
    (root / "samples" / "c000000.e0.g1.safetensors").write_bytes(b"the first stream's sample")
    before = _hashes(root)
    second = tmp_path / "b" / "ledger.sqlite"
    cfg = tiny_prepare(tmp_path / "unused")
    proc = _cli(
        "produce", f"--ledger={second}", "--store.kind=shared_dir", f"--store.root={root}",
        *[f"--prepare.{flag[2:]}" for flag in _flags(cfg)],
    )
    line = _one_line_error(proc)
    assert str(first.resolve()) in line and str(second.resolve()) in line and str(owner) in line
    assert _hashes(root) == before
    assert not (second.parent / "stream_manifest.json").exists()
