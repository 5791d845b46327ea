"""prepare end to end on the tiny target: shards, manifest, vocab, restart, refusals."""

import json

import pytest


from specforge_lightning.data.stores.shards import ShardError, load_sample, read_shard_index
from specforge_lightning.data.vocab import load_vocab_mapping
from specforge_lightning.target.prepare import PrepareConfig, prepare


def _cfg(tmp_path, **kw) -> PrepareConfig:
    base = dict(
        output_dir=str(tmp_path / "feats"), target="tiny-llama", num_samples=10, num_val_samples=3,
        max_length=64, draft_vocab_size=128, batch_size=4, shard_size=4, capture_dtype="float32",
        compute_dtype="float32", layer_preset="eagle3",
    )
    base.update(kw)
    return PrepareConfig(**base)


def test_prepare_writes_shards_manifest_and_vocab(tmp_path):
    cfg = _cfg(tmp_path)
    manifest = prepare(cfg, progress=False)
    out = tmp_path / "feats"
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest and manifest["complete"]
    for key in ("target_weights_hash", "tokenizer_hash", "chat_template_hash", "layer_ids", "capture_dtype"):
        assert manifest[key]
    assert manifest["layer_ids"] == [1, 3, 4]  # eagle3 preset on the 8-layer tiny target
    assert manifest["splits"]["train"]["num_samples"] == 10
    assert len(manifest["splits"]["train"]["shards"]) == 3
    refs = [r for rel in manifest["splits"]["train"]["shards"] for r in read_shard_index(out / rel)]
    assert len(refs) == 10 and len({r.sample_id for r in refs}) == 10
    sample = load_sample(out / manifest["splits"]["train"]["shards"][0], refs[0].sample_id)
    L = sample["input_ids"].shape[0]
    assert sample["aux_hidden_states"].shape == (L, 3 * manifest["hidden_size"])
    assert sample["last_hidden_state"].shape == (L, manifest["hidden_size"])
    assert L <= 64 and int(sample["loss_mask"].sum()) >= 2
    d2t, t2d = load_vocab_mapping(out / manifest["vocab_mapping"])
    assert d2t.shape == (128,) and int(t2d.sum()) == 128
    val_ids = {r.sample_id for rel in manifest["splits"]["val"]["shards"] for r in read_shard_index(out / rel)}
    assert val_ids.isdisjoint({r.sample_id for r in refs})


def test_rerun_skips_completed_shards_and_recaptures_broken_ones(tmp_path):
    cfg = _cfg(tmp_path)
    manifest = prepare(cfg, progress=False)
    out = tmp_path / "feats"
    first, second = (out / rel for rel in manifest["splits"]["train"]["shards"][:2])
    before = first.stat().st_mtime_ns
    second.write_bytes(second.read_bytes()[:100])  # truncated, as if killed mid-copy
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = prepare(cfg, progress=False)
    assert again["complete"]
    assert first.stat().st_mtime_ns == before  # untouched
    assert len(read_shard_index(second)) == 4  # captured again


def test_mismatched_manifest_is_refused_naming_the_field(tmp_path):
    prepare(_cfg(tmp_path), progress=False)
    with pytest.raises(ValueError, match="max_length"):
        prepare(_cfg(tmp_path, max_length=32), progress=False)
    with pytest.raises(ValueError, match="layer_ids"):
        prepare(_cfg(tmp_path, layer_ids=[0, 1, 2]), progress=False)


def test_nan_samples_are_skipped_and_counted(tmp_path, monkeypatch):
    from specforge_lightning.target import engine as engine_mod

    real = engine_mod.HFTargetEngine.capture

    def poisoned(self, tasks, layer_ids):
        feats = real(self, tasks, layer_ids)
        for task, f in zip(tasks, feats):
            if task.task_id.endswith("1"):
                f["last_hidden_state"][0, 0] = float("nan")
        return feats

    monkeypatch.setattr(engine_mod.HFTargetEngine, "capture", poisoned)
    manifest = prepare(_cfg(tmp_path), progress=False)
    out = tmp_path / "feats"
    ids = [r.sample_id for rel in manifest["splits"]["train"]["shards"] for r in read_shard_index(out / rel)]
    assert manifest["nan_skipped"] >= 1
    assert not any(i.endswith("1") for i in ids)


def test_corrupt_shard_error_names_the_file(tmp_path):
    bad = tmp_path / "shard_00000.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ShardError, match="shard_00000"):
        read_shard_index(bad)


def test_dropped_conversations_count_lone_user_turns_and_long_first_turns(tmp_path):
    from specforge_lightning.target.identity import load_tokenizer
    from specforge_lightning.target.prepare import build_tasks
    from specforge_lightning.target.zoo import resolve_target

    user = [{"role": "user", "content": "what is two plus two?"}]
    pair = [*user, {"role": "assistant", "content": "four, and that is all there is to say"}]
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"messages": c}) + "\n" for c in [user, pair, long, user, pair]))
    tokenizer = load_tokenizer(resolve_target("tiny-llama"))
    plan = build_tasks(_cfg(tmp_path, corpus=str(corpus), num_samples=2, num_val_samples=0), tokenizer)
    assert len(plan.train) == 2 and plan.dropped == 3  # two lone user turns and one too-long prompt
    with pytest.raises(ValueError) as err:
        build_tasks(_cfg(tmp_path, corpus=str(corpus), num_samples=3, num_val_samples=0), tokenizer)
    message = str(err.value)
    assert "gave only 2 usable conversations, 3 requested" in message
    assert "2 had no assistant turn" in message and "1 had a first turn longer than max_length (64 tokens)" in message
