"""Regeneration: the supervised text is exactly the target's own greedy answer."""

import torch

from specforge_lightning.data.stores.shards import load_sample, read_shard_index
from specforge_lightning.target.prepare import PrepareConfig, prepare
from specforge_lightning.target.zoo import load_target, resolve_target


def test_regenerated_samples_are_the_targets_greedy_answers(tmp_path):
    cfg = PrepareConfig(
        output_dir=str(tmp_path / "feats"), target="tiny-llama", num_samples=4, num_val_samples=1,
        max_length=96, draft_vocab_size=64, batch_size=4, shard_size=8, capture_dtype="float32",
        compute_dtype="float32", regenerate=True, regenerate_max_new_tokens=12, regenerate_batch_size=3,
        layer_preset="eagle3",
    )
    manifest = prepare(cfg, progress=False)
    assert manifest["regenerate"] and manifest["complete"]
    shard = tmp_path / "feats" / manifest["splits"]["train"]["shards"][0]
    model, _ = load_target(str(resolve_target("tiny-llama")), dtype=torch.float32)
    refs = read_shard_index(shard)
    assert len(refs) == 4
    for ref in refs:
        sample = load_sample(shard, ref.sample_id)
        ids, mask = sample["input_ids"], sample["loss_mask"]
        start = int(mask.nonzero()[0])
        assert mask[start:].all() and not mask[:start].any()  # prompt unsupervised, answer supervised
        with torch.no_grad():
            gen = model.generate(ids[None, :start], max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
        want = gen[0, start:].tolist()
        if 2 in want:
            want = want[: want.index(2) + 1]
        assert ids[start:].tolist() == want
    # A rerun reuses the cached answers and the completed shards.
    cache = tmp_path / "feats" / "regenerated.jsonl"
    assert cache.exists()
    again = prepare(cfg, progress=False)
    assert again == manifest


def test_regenerate_samples_mixes_target_answers_with_the_corpus_own(tmp_path):
    """The first ``regenerate_samples`` train conversations and all of val are regenerated; the rest follow
    them in the corpus with their own answers, and held-out prompts start after everything read."""
    from transformers import AutoTokenizer

    from specforge_lightning.target.prepare import build_tasks

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_target("tiny-llama")))
    model, _ = load_target(str(resolve_target("tiny-llama")), dtype=torch.float32)
    cfg = PrepareConfig(
        target="tiny-llama", num_samples=5, num_val_samples=2, max_length=96, regenerate=True,
        regenerate_max_new_tokens=6, regenerate_batch_size=4, regenerate_samples=2,
    )
    plan = build_tasks(cfg, tokenizer, model)
    assert [t.provenance.get("regenerated", False) for t in plan.train] == [True, True, False, False, False]
    assert all(t.provenance.get("regenerated") for t in plan.val)
    index = lambda t: int(t.task_id[1:])  # noqa: E731
    regen_ids = [index(t) for t in plan.train[:2] + plan.val]
    own_ids = [index(t) for t in plan.train[2:]]
    assert min(own_ids) > max(regen_ids)  # no conversation is used twice
    assert plan.corpus_end == max(own_ids) + 1
    # The corpus's own answers are the plain tokenization, every assistant turn supervised.
    plain = build_tasks(PrepareConfig(target="tiny-llama", num_samples=40, num_val_samples=0, max_length=96), tokenizer)
    by_id = {t.task_id: t for t in plain.train}
    for t in plan.train[2:]:
        assert t.input_ids == by_id[t.task_id].input_ids and t.loss_mask == by_id[t.task_id].loss_mask


def test_regenerate_samples_is_checked():
    import pytest

    with pytest.raises(ValueError, match="regenerate_samples needs regenerate"):
        PrepareConfig(regenerate_samples=3)
    with pytest.raises(ValueError, match="between 0 and num_samples"):
        PrepareConfig(regenerate=True, num_samples=4, regenerate_samples=5)


def test_features_with_another_regenerate_samples_are_refused(tmp_path):
    """Changing how many answers are regenerated changes the features: the datamodule names the field."""
    import json

    import pytest

    from specforge_lightning.datamodules import FeatureDataModule

    manifest = {"complete": True, "target": "tiny-llama", "corpus": "sharegpt", "skip_samples": 0,
                "num_samples": 4, "num_val_samples": 1, "max_length": 96, "max_messages": None,
                "train_only_last_turn": False, "capture_dtype": "float32", "draft_vocab_size": 64,
                "regenerate": True, "regenerate_samples": 2}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    prep = dict(output_dir=str(tmp_path), target="tiny-llama", num_samples=4, num_val_samples=1, max_length=96,
                capture_dtype="float32", draft_vocab_size=64, regenerate=True)
    FeatureDataModule(prepare=PrepareConfig(**prep, regenerate_samples=2)).prepare_data()  # same: accepted
    with pytest.raises(ValueError, match="regenerate_samples: prepared 2, requested 3"):
        FeatureDataModule(prepare=PrepareConfig(**prep, regenerate_samples=3)).prepare_data()
