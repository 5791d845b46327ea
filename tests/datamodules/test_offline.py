"""FeatureDataModule.sample_features: the first samples of a split, for data-dependent initialisation."""

import pytest
import torch

from specforge_lightning.datamodules import FeatureDataModule
from specforge_lightning.data.stores.shards import load_sample, read_shard_index
from specforge_lightning.target.prepare import PrepareConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("feats")
    return PrepareConfig(
        output_dir=str(out), target="tiny-llama", num_samples=6, num_val_samples=1, max_length=96,
        draft_vocab_size=64, batch_size=4, shard_size=4, capture_dtype="float32", compute_dtype="float32",
        layer_preset="eagle3",
    )


def test_sample_features_reads_the_first_samples_in_order(prepared):
    dm = FeatureDataModule(prepare=prepared, batch_size=2, shuffle=True)
    dm.prepare_data()
    samples = dm.sample_features(5, keys=("input_ids", "aux_hidden_states"))
    shards = [dm.features_dir / s for s in dm.manifest["splits"]["train"]["shards"]]
    assert len(shards) == 2  # the five samples cross a shard boundary
    refs = [(shard, ref) for shard in shards for ref in read_shard_index(shard)][:5]
    assert len(samples) == 5
    for sample, (shard, ref) in zip(samples, refs, strict=True):
        want = load_sample(shard, ref.sample_id)
        assert set(sample) == {"input_ids", "aux_hidden_states"}
        assert torch.equal(sample["input_ids"], want["input_ids"])
        assert torch.equal(sample["aux_hidden_states"], want["aux_hidden_states"])
    assert len(dm.sample_features(100)) == 6  # at most the split


def test_sample_features_leaves_the_train_order_alone(prepared):
    def first_ids(touch: bool) -> list[str]:
        dm = FeatureDataModule(prepare=prepared, batch_size=2, shuffle=True, seed=3)
        dm.prepare_data()
        dm.setup("fit")
        if touch:
            dm.sample_features(3)
        return [sid for batch in dm.train_dataloader() for sid in batch.sample_ids]

    assert first_ids(True) == first_ids(False)


def test_sample_features_of_a_missing_split_is_refused(prepared):
    dm = FeatureDataModule(prepare=prepared)
    dm.prepare_data()
    with pytest.raises(ValueError, match="no 'test' samples"):
        dm.sample_features(1, split="test")


def test_optional_features_are_kept_when_present_and_not_required():
    from specforge_lightning.contracts import StrategySpec
    from specforge_lightning.datamodules import SampleTransform

    spec = StrategySpec(name="s", features=("input_ids", "loss_mask"), optional_features=("target_top1",))
    base = {"input_ids": torch.arange(4), "loss_mask": torch.ones(4, dtype=torch.long), "other": torch.zeros(4)}
    with_top1 = SampleTransform(spec, max_length=3)({**base, "target_top1": torch.arange(4)})
    assert sorted(with_top1) == ["input_ids", "loss_mask", "target_top1"]
    assert with_top1["target_top1"].tolist() == [0, 1, 2]  # truncated with the rest
    assert sorted(SampleTransform(spec, max_length=None)(dict(base))) == ["input_ids", "loss_mask"]
    with pytest.raises(KeyError, match="input_ids"):
        SampleTransform(spec, max_length=None)({"loss_mask": base["loss_mask"]})
