"""One feature-identity check: prepare, the offline datamodule and the stream consumer refuse features
captured from another state of the same target folder (weights, chat template), and a damaged folder is
refused with the fix. Every refusal leaves the files as they were."""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specforge_lightning.control.producer import write_stream_manifest
from specforge_lightning.data.manifest import REPAIR_HINT, FeatureMismatchError, MissingFeaturesError
from specforge_lightning.data.stores import shards
from specforge_lightning.data.stores.spec import StoreSpec
from specforge_lightning.data.vocab import VocabFileError
from specforge_lightning.datamodules import FeatureDataModule
from specforge_lightning.datamodules.checks import check_features
from specforge_lightning.datamodules.ledger import open_ledger
from specforge_lightning.errors import UserError
from specforge_lightning.target.prepare import PrepareConfig, prepare
from specforge_lightning.target.producer import STREAM_IDENTITY_FIELDS
from specforge_lightning.target.zoo import resolve_target


def _cfg(tmp_path, target, **kw) -> PrepareConfig:
    base = dict(
        output_dir=str(tmp_path / "feats"), target=str(target), num_samples=6, num_val_samples=0, max_length=48,
        draft_vocab_size=64, batch_size=4, shard_size=4, capture_dtype="float32", compute_dtype="float32",
        layer_preset="eagle3",
    )
    return PrepareConfig(**{**base, **kw})


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def target_copy(tmp_path_factory):
    return Path(shutil.copytree(resolve_target("tiny-llama"), tmp_path_factory.mktemp("t") / "target"))


@pytest.fixture
def prepared(tmp_path, target_copy):
    target = Path(shutil.copytree(target_copy, tmp_path / "target"))
    cfg = _cfg(tmp_path, target)
    return cfg, prepare(cfg, progress=False), target


def _change_weights(target: Path) -> None:
    (weights,) = target.glob("*.safetensors")
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(weights))


def _open_stream(tmp_path, manifest, cfg):
    ledger = tmp_path / "stream" / "ledger.sqlite"
    ledger.parent.mkdir()
    write_stream_manifest(ledger, {**manifest, "stream": {}}, STREAM_IDENTITY_FIELDS)
    store = StoreSpec(kind="shared_dir", root=str(tmp_path / "store"))
    return open_ledger(
        str(ledger), cfg, None, check_config=False, store_spec=store, consumer="t", lease_s=5.0,
        manifest_timeout_s=0.1, val_dir=None, epochs=1, shuffle=False, seed=0, world=1,
    )


def test_changed_target_weights_are_refused_by_prepare_the_datamodule_and_the_stream(prepared, tmp_path):
    cfg, manifest, target = prepared
    out = Path(cfg.output_dir)
    _change_weights(target)
    before = _hashes(out)
    with pytest.raises(FeatureMismatchError) as err:
        prepare(cfg, progress=False)
    assert "holds features prepared differently (target_weights_hash: prepared" in str(err.value)
    with pytest.raises(FeatureMismatchError) as err:
        FeatureDataModule(prepare=cfg).setup("fit")
    message = str(err.value)
    assert f"features in {out} do not match this run (target_weights_hash: prepared {manifest['target_weights_hash']!r}" in message
    assert f"the target folder {target} changed since they were captured" in message and "another output_dir" in message
    with pytest.raises(FeatureMismatchError, match="target_weights_hash.*restart the producer"):
        _open_stream(tmp_path, manifest, cfg)
    assert _hashes(out) == before
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_a_changed_chat_template_is_refused(prepared):
    cfg, _, target = prepared
    template = target / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(FeatureMismatchError, match="chat_template_hash: prepared"):
        FeatureDataModule(prepare=cfg).setup("fit")


def test_dtype_and_max_length_are_compared_with_the_run(prepared):
    cfg, manifest, _ = prepared
    for field, value in (("capture_dtype", "bfloat16"), ("max_length", 32)):
        other = PrepareConfig(**{**cfg.__dict__, field: value})
        with pytest.raises(FeatureMismatchError, match=f"{field}: prepared"):
            check_features(manifest, other, None, "features")


def test_a_damaged_folder_fails_naming_the_shard_and_the_fix(prepared):
    cfg, manifest, _ = prepared
    rel = manifest["splits"]["train"]["shards"][1]
    path = Path(cfg.output_dir) / rel
    path.write_bytes(path.read_bytes()[:-32])
    with pytest.raises(MissingFeaturesError) as err:
        FeatureDataModule(prepare=cfg).setup("fit")
    assert rel in str(err.value) and REPAIR_HINT in str(err.value)
    assert REPAIR_HINT == "rerun prepare with the same config (it repairs damaged shards)"


def test_a_pickle_in_place_of_the_vocab_mapping_is_named(prepared):
    cfg, manifest, _ = prepared
    vocab = Path(cfg.output_dir) / manifest["vocab_mapping"]
    torch.save({"d2t": torch.zeros(3)}, vocab)
    with pytest.raises(VocabFileError) as err:
        FeatureDataModule(prepare=cfg).setup("fit")
    assert str(vocab) in str(err.value) and "not a safetensors file" in str(err.value)
    again = prepare(cfg, progress=False)  # a complete folder with a damaged vocab file is repaired too
    assert again["repaired_shards"] == [manifest["vocab_mapping"]]
    FeatureDataModule(prepare=cfg).setup("fit")


def test_a_full_disk_names_the_shard(tmp_path, target_copy, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "save_file", full)
    cfg = _cfg(tmp_path, target_copy)
    with pytest.raises(shards.ShardWriteError) as err:
        prepare(cfg, progress=False)
    assert "no space left on the device writing shard" in str(err.value)
    assert str(Path(cfg.output_dir) / "train" / "shard_00000.safetensors") in str(err.value)
    assert isinstance(err.value, UserError)
