import pytest

from specforge_lightning.target.layers import eagle3_layer_ids, resolve_layer_ids, spread_layer_ids


def test_eagle3_default_matches_upstream_for_smollm2():
    assert eagle3_layer_ids(30) == [1, 14, 26]


def test_spread_matches_upstream_example():
    assert spread_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert spread_layer_ids(30, 1) == [15]


def test_explicit_ids_win_and_are_checked():
    assert resolve_layer_ids("eagle3", 8, [0, 2, 7]) == [0, 2, 7]
    with pytest.raises(ValueError, match="outside"):
        resolve_layer_ids("eagle3", 8, [8])
    with pytest.raises(ValueError, match="unknown layer preset"):
        resolve_layer_ids("nope", 8)


def test_planned_layers_come_from_the_config_else_the_algorithms_preset():
    from specforge_lightning.contracts import StrategySpec
    from specforge_lightning.target.layers import planned_layer_ids

    spec = StrategySpec(name="s", features=(), layer_preset="spread:3")
    assert planned_layer_ids(30, None, None, spec) == spread_layer_ids(30, 3)
    assert planned_layer_ids(30, "eagle3", None, spec) == eagle3_layer_ids(30)
    assert planned_layer_ids(30, None, [2, 4], spec) == [2, 4]
    with pytest.raises(ValueError, match="data.init_args.prepare.layer_preset"):
        planned_layer_ids(30, None, None, None)
