"""Regeneration: the supervised text is exactly the target's own greedy answer."""

import torch

from specforge_lightning.data.shards import load_sample, read_shard_index
from specforge_lightning.target.prepare import PrepareConfig, prepare
from specforge_lightning.target.zoo import load_target, resolve_target


def test_regenerated_samples_are_the_targets_greedy_answers(tmp_path):
    cfg = PrepareConfig(
        output_dir=str(tmp_path / "feats"), target="tiny-llama", num_samples=4, num_val_samples=1,
        max_length=96, draft_vocab_size=64, batch_size=4, shard_size=8, capture_dtype="float32",
        compute_dtype="float32", regenerate=True, regenerate_max_new_tokens=12, regenerate_batch_size=3,
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
