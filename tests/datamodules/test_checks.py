"""The datamodules refuse features their algorithm cannot use: layers, layer count, captured features."""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from specforge_lightning.contracts import StrategySpec
from specforge_lightning.datamodules import FeatureDataModule
from specforge_lightning.datamodules.checks import CONFIG_FIELDS, check_features, trainer_strategy_spec
from specforge_lightning.target.layers import eagle3_layer_ids, spread_layer_ids
from specforge_lightning.target.prepare import PrepareConfig

NUM_LAYERS = 30
DFLASH_LIKE = StrategySpec(
    name="dflash-like", features=("input_ids", "loss_mask", "aux_hidden_states"), min_supervised_run=2,
    layer_preset="spread:5",
)
EAGLE3_LIKE = StrategySpec(
    name="eagle3-like", features=("input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state"),
    layer_preset="eagle3", layer_count=3,
)


def _manifest(cfg: PrepareConfig, layer_ids: list[int], **extra) -> dict:
    fields = {k: v for k, v in asdict(cfg).items() if k in CONFIG_FIELDS}
    return {**fields, "layer_ids": layer_ids, "num_layers": NUM_LAYERS, "complete": True, **extra}


def _trainer(spec: StrategySpec | None = None, module: object | None = None) -> SimpleNamespace:
    module = module if module is not None else SimpleNamespace(strategy_spec=spec)
    return SimpleNamespace(lightning_module=module, global_rank=0, world_size=1)


def test_the_algorithms_preset_refuses_features_captured_with_other_layers(tmp_path):
    cfg = PrepareConfig(output_dir=str(tmp_path), target="tiny-llama")  # names no preset: the algorithm's
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest(cfg, eagle3_layer_ids(NUM_LAYERS))))
    dm = FeatureDataModule(prepare=cfg)
    dm.trainer = _trainer(DFLASH_LIKE)
    with pytest.raises(ValueError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "layer_ids" in message and str(tmp_path) in message
    assert str(eagle3_layer_ids(NUM_LAYERS)) in message and str(spread_layer_ids(NUM_LAYERS, 5)) in message
    assert "'spread:5'" in message and "data.init_args.prepare.layer_preset" in message and "output_dir" in message


def test_a_configured_preset_wins_over_the_algorithms():
    cfg = PrepareConfig(target="tiny-llama", layer_preset="eagle3")
    check_features(_manifest(cfg, eagle3_layer_ids(NUM_LAYERS)), cfg, DFLASH_LIKE, "features")  # accepted
    with pytest.raises(ValueError, match="layer_ids: prepared"):
        check_features(_manifest(cfg, spread_layer_ids(NUM_LAYERS, 5)), cfg, DFLASH_LIKE, "features")


def test_a_layer_count_other_than_the_algorithms_is_refused():
    five = spread_layer_ids(NUM_LAYERS, 5)
    cfg = PrepareConfig(target="tiny-llama", layer_ids=five)  # the layers themselves match
    with pytest.raises(ValueError) as err:
        check_features(_manifest(cfg, five), cfg, EAGLE3_LIKE, "features in x")
    message = str(err.value)
    assert "layer_count" in message and "5 layers" in message and "takes 3" in message
    assert "data.init_args.prepare.layer_preset" in message
    check_features(_manifest(cfg, five), cfg, DFLASH_LIKE, "features in x")  # any count: accepted


def test_features_the_algorithm_needs_must_have_been_captured():
    cfg = PrepareConfig(target="tiny-llama", layer_preset="eagle3")
    layers = eagle3_layer_ids(NUM_LAYERS)
    partial = _manifest(cfg, layers, features=["input_ids", "loss_mask", "aux_hidden_states"])
    with pytest.raises(ValueError, match=r"features: captured .*needs \['last_hidden_state'\]"):
        check_features(partial, cfg, EAGLE3_LIKE, "features")
    check_features(partial, cfg, DFLASH_LIKE, "features")
    check_features(_manifest(cfg, layers), cfg, EAGLE3_LIKE, "features")  # older manifest: the five standard ones


def test_without_a_trainer_there_is_no_spec_and_a_module_must_declare_one():
    assert trainer_strategy_spec(None) is None
    assert trainer_strategy_spec(_trainer(DFLASH_LIKE)) is DFLASH_LIKE
    with pytest.raises(TypeError, match="declares no strategy_spec"):
        trainer_strategy_spec(_trainer(module=object()))
