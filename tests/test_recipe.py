"""Recipe validation: every problem is one message naming the key path and what is allowed."""

from pathlib import Path

import pytest
import yaml

from tersa.errors import RecipeError
from tersa.quant.stage import QuantizeConfig
from tersa.recipe import config_fields, load_recipe, parse_recipe

RECIPES = sorted(
    p
    for p in (Path(__file__).parent.parent / "tersa" / "recipes").glob("*.yaml")
    # training recipes: tests/kv/test_train.py; studies: tests/study/test_schema.py
    if not {"training", "policies"} & set(yaml.safe_load(p.read_text()))
)


def _err(data: object) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, source="r.yaml")
    return str(e.value)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_parse_and_round_trip(path: Path) -> None:
    recipe = load_recipe(path)
    again = parse_recipe(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()


def test_a_study_is_sent_to_tersa_study() -> None:
    assert _err({"version": 1, "models": ["m"], "policies": ["dense"]}) == (
        "r.yaml: this is a study; run it with `tersa study`"
    )


def test_defaults_are_filled_in() -> None:
    r = parse_recipe({"model": "m", "stages": [{"quantize": {}}]})
    name, cfg = r.stages[0]
    assert name == "quantize" and isinstance(cfg, QuantizeConfig)
    assert (
        cfg.weights.bits == 8 and cfg.weights.granularity == "channel" and cfg.activations is None
    )
    assert r.evaluation.seq_len == 512 and r.evaluation.max_windows == 40
    d = r.to_dict()
    assert d["stages"][0]["quantize"]["weights"]["symmetric"] is True


def test_unknown_nested_key_names_path_and_allowed() -> None:
    msg = _err({"model": "m", "stages": [{"quantize": {"weights": {"bitz": 4}}}]})
    assert msg == (
        "r.yaml: stages[0].quantize.weights: unknown key 'bitz'; "
        "allowed: bits, granularity, group_size, symmetric"
    ).replace("weights: unknown", "weights.bitz: unknown")


def test_out_of_range_value() -> None:
    msg = _err({"model": "m", "stages": [{"quantize": {"weights": {"bits": 9}}}]})
    assert (
        msg
        == "r.yaml: stages[0].quantize.weights.bits: input should be less than or equal to 8 (got 9)"
    )


def test_wrong_type_is_not_coerced() -> None:
    msg = _err({"model": "m", "stages": [{"quantize": {"weights": {"bits": "8"}}}]})
    assert (
        msg == "r.yaml: stages[0].quantize.weights.bits: input should be a valid integer (got '8')"
    )


def test_bad_literal_lists_choices() -> None:
    msg = _err({"model": "m", "stages": [{"quantize": {"activations": {"granularity": "row"}}}]})
    assert msg == (
        "r.yaml: stages[0].quantize.activations.granularity: input should be 'tensor' or 'token' "
        "(got 'row')"
    )


def test_cross_field_check() -> None:
    msg = _err({"model": "m", "stages": [{"quantize": {"weights": {"granularity": "group"}}}]})
    assert (
        msg
        == "r.yaml: stages[0].quantize.weights: granularity 'group' needs group_size (for example 128)"
    )


def test_unknown_stage_lists_registered_stages() -> None:
    msg = _err({"model": "m", "stages": [{"quantise": {}}]})
    assert (
        msg == "r.yaml: stages[0]: unknown stage 'quantise'; allowed: kv, l2, os_plus, "
        "outlier_suppression, "
        "quantize, smoothquant, structured_ffn"
    )


def test_unknown_top_level_key() -> None:
    msg = _err({"model": "m", "stages": [], "calibraton": {}})
    assert msg.startswith(
        "r.yaml: calibraton: unknown key 'calibraton'; allowed: model, stages, dtype"
    )


def test_several_problems_in_one_message() -> None:
    msg = _err({"model": "m", "dtype": "fp8", "stages": [{"quantize": {"weights": {"bits": 1}}}]})
    lines = msg.splitlines()
    assert lines[0] == "r.yaml: invalid recipe"
    assert any(line.strip().startswith("dtype:") for line in lines)
    assert any("stages[0].quantize.weights.bits" in line for line in lines)


def test_missing_model_and_not_a_mapping() -> None:
    assert _err({"stages": []}) == "r.yaml: missing key 'model' (embedded:smollm2-135m or a folder)"
    assert _err([1, 2]).startswith("r.yaml: a recipe is a mapping with keys model")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nstages:\n  - quantize: {weights: {bits: 4}\n")
    with pytest.raises(RecipeError, match=r"is not valid YAML at line \d+, column \d+"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "nope.yaml")
    assert (
        str(e.value)
        == f"recipe '{tmp_path / 'nope.yaml'}' does not exist; give the path of a recipe YAML file"
    )


def test_config_fields_for_stages_listing() -> None:
    rows = {
        name: (typ, default, desc) for name, typ, default, desc in config_fields(QuantizeConfig)
    }
    assert rows["method"][1] == "rtn"
    assert rows["weights"][1] == "{...}" and rows["weights.bits"][1] == 8
    assert rows["weights.granularity"][0] == "'tensor' | 'channel' | 'group'"
    assert rows["activations.bits"][1] == 8 and rows["activations"][1] is None
    assert "globs" in rows["ignore"][2]
