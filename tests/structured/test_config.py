"""structured_ffn recipe errors: each names the key and what is allowed."""

from __future__ import annotations

import pytest

from tersa.errors import RecipeError
from tersa.recipe import parse_recipe
from tersa.structured.config import HealingConfig, StructuredFFNConfig

AT = "recipe: stages[0].structured_ffn"


def error(fields: dict) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": "m", "stages": [{"structured_ffn": fields}]})
    return str(info.value)


def config(fields: dict) -> StructuredFFNConfig:
    return parse_recipe({"model": "m", "stages": [{"structured_ffn": fields}]}).stages[0][1]


def test_defaults() -> None:
    cfg = config({"fraction": 0.63})
    assert cfg.kind == "lowrank" and cfg.keep_dense == [0] and cfg.healing is None
    assert cfg.merge_below is None and cfg.activation_aware and cfg.needs_calibration
    assert not config({"rank": 8, "activation_aware": False}).needs_calibration
    healing = config({"fraction": 0.5, "healing": {}}).healing
    assert healing == HealingConfig() and healing.mode == "self_guided"


def test_size_errors() -> None:
    assert error({}) == f"{AT}: set fraction (e.g. 0.63) or rank to size the lowrank layers"
    assert error({"kind": "blockshuffle"}) == (
        f"{AT}: set fraction (e.g. 0.63) or blocks to size the blockshuffle layers"
    )
    assert error({"fraction": 0.5, "rank": 8}) == (
        f"{AT}: give fraction or rank, not both (fraction=0.5, rank=8)"
    )
    assert error({"rank": 8, "blocks": 2}) == (
        f"{AT}: lowrank takes no blocks (got blocks=2); set fraction or rank"
    )
    assert error({"kind": "blockshuffle", "rank": 8}) == (
        f"{AT}: blockshuffle takes no rank (got rank=8); set fraction or blocks"
    )
    assert error({"kind": "blockshuffle", "fraction": 0.5, "blocks": 4}) == (
        f"{AT}: give fraction or blocks, not both (fraction=0.5, blocks=4): blockshuffle's "
        "block count sets its size"
    )
    assert error({"rank": 8, "rank_multiple": 8}) == (
        f"{AT}: rank_multiple (8) rounds a rank derived from fraction; drop it or set fraction "
        "instead of rank"
    )


def test_value_errors_name_the_key() -> None:
    assert error({"fraction": 1.5}) == (
        f"{AT}.fraction: input should be less than or equal to 1 (got 1.5)"
    )
    assert error({"fraction": 0}) == f"{AT}.fraction: input should be greater than 0 (got 0)"
    assert error({"kind": "sparse", "fraction": 0.5}).startswith(
        f"{AT}.kind: input should be 'lowrank', 'blockdense' or 'blockshuffle'"
    )
    assert error({"fraction": 0.5, "merge_below": -1}) == (
        f"{AT}.merge_below: input should be greater than or equal to 0 (got -1)"
    )
    assert error({"fraction": 0.5, "healing": {"mode": "guided"}}) == (
        f"{AT}.healing.mode: input should be 'self_guided' or 'plain' (got 'guided')"
    )
    assert error({"fraction": 0.5, "healing": {"guided_fraction": 0}}) == (
        f"{AT}.healing.guided_fraction: input should be greater than 0 (got 0)"
    )


def test_unknown_keys_list_the_allowed_ones() -> None:
    msg = error({"fraction": 0.5, "ranks": 8})
    assert msg.startswith(f"{AT}.ranks: unknown key 'ranks'; allowed: kind, fraction, rank,")
    assert "merge_below" in msg and "healing" in msg
    msg = error({"fraction": 0.5, "healing": {"step": 3}})
    assert msg.startswith(f"{AT}.healing.step: unknown key 'step'; allowed: mode, steps, lr,")


def test_outlier_transforms_must_come_first() -> None:
    stages = [{"structured_ffn": {"fraction": 0.5}}, {"os_plus": {}}, {"quantize": {}}]
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": "m", "stages": stages})
    assert str(info.value) == (
        "recipe: stages[1]: 'os_plus' cannot handle what 'structured_ffn' (stages[0]) builds and "
        "must come before it; move it up"
    )
    stages = [{"quantize": {}}, {"structured_ffn": {"fraction": 0.5}}]
    with pytest.raises(RecipeError, match=r"'structured_ffn' transforms the float model"):
        parse_recipe({"model": "m", "stages": stages})
