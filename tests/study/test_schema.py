"""Study files: what loads, each rejection's exact message, and the grid the study expands to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tersa.errors import RecipeError
from tersa.study import Cell, cell_key, cells, load_study

RECIPE = {"model": "embedded:smollm2-135m", "stages": [{"quantize": {"weights": {"bits": 8}}}]}
POLICIES_ALLOWED = "dense, streaming, snapkv, quest, moba"
BUDGET_HELP = "a fraction of the context (0 < b <= 1) or a token count (an integer >= 1)"


def study(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "models": ["m1"],
        "policies": ["dense", {"name": "quest", "page": 16}],
        "budgets": [0.25, 64],
        "contexts": [256],
        "tasks": {"needle": {"n": 2}},
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error(tmp_path: Path, data: Any) -> str:
    with pytest.raises(RecipeError) as e:
        load_study(write(tmp_path / "s.yaml", data))
    return str(e.value).removeprefix(f"{tmp_path / 's.yaml'}: ")


def test_loads_with_defaults(tmp_path) -> None:
    s = load_study(write(tmp_path / "my-study.yaml", study()))
    assert s.name == "my-study"
    assert s.dtype == "float32" and s.seed == 0
    assert [(q.name, q.recipe) for q in s.quant] == [("fp", None)]
    assert [(p.name, p.options) for p in s.policies] == [("dense", {}), ("quest", {"page": 16})]
    assert s.budgets == [0.25, 64] and isinstance(s.budgets[1], int)
    assert s.tasks.needle is not None and (s.tasks.needle.n, s.tasks.needle.keys) == (2, 4)
    assert s.tasks.passkey is None
    assert (s.plot.x, s.plot.y) == ("kv_fraction_read", "needle_exact")


def test_normalized_dict_loads_back_as_the_same_study(tmp_path) -> None:
    write(tmp_path / "r.yaml", RECIPE)
    s = load_study(write(tmp_path / "s.yaml", study(quant=[{"name": "q", "recipe": "r.yaml"}])))
    again = load_study(write(tmp_path / "again.yaml", s.to_dict()))
    assert again == s


def test_recipe_resolves_next_to_the_study_first_then_the_cwd(tmp_path, monkeypatch) -> None:
    (tmp_path / "studies").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    write(tmp_path / "cwd" / "r.yaml", RECIPE)
    data = study(quant=[{"name": "fp", "recipe": None}, {"name": "w8", "recipe": "r.yaml"}])
    s = load_study(write(tmp_path / "studies" / "s.yaml", data))
    assert s.quant[1].recipe == str(tmp_path / "cwd" / "r.yaml")
    write(tmp_path / "studies" / "r.yaml", RECIPE)
    s = load_study(tmp_path / "studies" / "s.yaml")
    assert s.quant[1].recipe == str(tmp_path / "studies" / "r.yaml")


def test_unknown_key(tmp_path) -> None:
    assert error(tmp_path, study(polices=["dense"])) == (
        "polices: unknown key 'polices'; allowed: version, name, models, dtype, quant, "
        "policies, budgets, contexts, tasks, seed, plot"
    )


def test_unknown_nested_key(tmp_path) -> None:
    assert error(tmp_path, study(tasks={"needle": {"key": 4}})) == (
        "tasks.needle.key: unknown key 'key'; allowed: n, keys"
    )


def test_bad_policy_name(tmp_path) -> None:
    assert error(tmp_path, study(policies=["dense", "h2o"])) == (
        f"policies[1]: unknown policy 'h2o'; allowed: {POLICIES_ALLOWED}"
    )


@pytest.mark.parametrize("budget", [0, 1.5, 0.0, -2, True, "0.5"])
def test_bad_budget(tmp_path, budget) -> None:
    assert error(tmp_path, study(budgets=[0.5, budget])) == (
        f"budgets[1]: a budget is {BUDGET_HELP}; got {budget!r}"
    )


def test_missing_version(tmp_path) -> None:
    data = study()
    del data["version"]
    assert error(tmp_path, data) == "version: missing required key; add 'version: 1'"


def test_unsupported_version(tmp_path) -> None:
    assert error(tmp_path, study(version=2)) == (
        "version: input should be less than or equal to 1 (got 2)"
    )


def test_nonexistent_recipe(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    data = study(quant=[{"name": "w8", "recipe": "nope.yaml"}])
    with pytest.raises(RecipeError) as e:
        load_study(write(tmp_path / "sub" / "s.yaml", data))
    assert str(e.value) == (
        f"{tmp_path / 'sub' / 's.yaml'}: quant[0].recipe: no recipe file 'nope.yaml' "
        f"(looked for {tmp_path / 'sub' / 'nope.yaml'}, {tmp_path / 'nope.yaml'})"
    )


def test_invalid_recipe_is_reported_under_its_quant_entry(tmp_path) -> None:
    write(tmp_path / "r.yaml", {"model": "m", "stages": ["nope"]})
    msg = error(tmp_path, study(quant=[{"name": "x", "recipe": "r.yaml"}]))
    assert msg.startswith(
        f"quant[0].recipe: {tmp_path / 'r.yaml'}: stages[0]: unknown stage 'nope'"
    )


def test_sparse_policies_need_budgets(tmp_path) -> None:
    assert error(tmp_path, study(budgets=None, policies=["quest", "dense", "moba"])) == (
        f"budgets: missing; moba, quest need budgets, each {BUDGET_HELP}"
    )
    assert load_study(write(tmp_path / "d.yaml", study(budgets=None, policies=["dense"])))


def test_plot_axis_must_be_measured(tmp_path) -> None:
    assert error(tmp_path, study(plot={"y": "ppl"})) == (
        "plot.y: 'ppl' is not a metric of this study; allowed: kv_bytes_kept, kv_bytes_read, "
        "kv_fraction_kept, kv_fraction_read, needle_exact"
    )


def test_needs_a_task(tmp_path) -> None:
    assert error(tmp_path, study(tasks={})) == (
        "tasks: configure at least one of passkey, needle, recall, ppl"
    )


def test_duplicate_labels(tmp_path) -> None:
    quant = [{"name": "a"}, {"name": "a"}]
    assert error(tmp_path, study(quant=quant)) == "quant[1]: repeats quant[0]; remove it"
    # the same budget as a fraction and as a token count are different budgets
    assert load_study(write(tmp_path / "ok.yaml", study(budgets=[1, 1.0])))


def test_several_problems_in_one_message(tmp_path) -> None:
    lines = error(tmp_path, study(dtype="fp8", contexts=[0], policies=["nope"])).splitlines()
    assert lines[0] == "invalid study"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "dtype",
        "contexts[0]",
        "policies[0]",
    ]


def test_not_a_mapping(tmp_path) -> None:
    assert error(tmp_path, ["dense"]).startswith("a study is a mapping with keys version, name")


def test_grid_order_and_dense_has_one_budget(tmp_path) -> None:
    data = study(
        models=["m1", "m2"],
        quant=[{"name": "fp"}, {"name": "q"}],
        contexts=[128, 256],
        policies=["dense", "streaming"],
        budgets=[0.5, 16],
    )
    grid = cells(load_study(write(tmp_path / "s.yaml", data)))
    assert len(grid) == 2 * 2 * 2 * (1 + 2)
    assert grid[:6] == [
        Cell("m1", "fp", "dense", 1.0, 128),
        Cell("m1", "fp", "streaming", 0.5, 128),
        Cell("m1", "fp", "streaming", 16, 128),
        Cell("m1", "fp", "dense", 1.0, 256),
        Cell("m1", "fp", "streaming", 0.5, 256),
        Cell("m1", "fp", "streaming", 16, 256),
    ]
    assert [(c.model, c.quant) for c in grid[::6]] == [
        ("m1", "fp"),
        ("m1", "q"),
        ("m2", "fp"),
        ("m2", "q"),
    ]


def test_cell_key_is_stable_and_distinguishes_options_and_budget_kinds() -> None:
    cell = Cell("m", "fp", "quest", 0.25, 1024, {"page": 16, "a": 1})
    assert cell_key(cell) == 'm|fp|quest|{"a":1,"page":16}|0.25|1024'
    assert cell_key(Cell("m", "fp", "quest", 1, 1024)) != cell_key(
        Cell("m", "fp", "quest", 1.0, 1024)
    )
    assert cell_key(Cell("m", "fp", "quest", 1.0, 8, {"page": 8})) != cell_key(
        Cell("m", "fp", "quest", 1.0, 8, {"page": 16})
    )


@pytest.mark.parametrize("name", ["a/b", "..", "a\\b"])
def test_name_must_be_one_folder_name(tmp_path, name) -> None:
    assert error(tmp_path, study(name=name)) == (
        f"name: '{name}' names the output folder out/<name>; use one folder name "
        "(no / or \\, not . or ..)"
    )


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            {"name": "quest", "sinks": 4},
            "policies[0]: unknown option(s) sinks for KV policy 'quest'; allowed: budget, "
            "dense_layers, page, heads",
        ),
        ({"name": "quest", "page": 0}, "policies[0]: quest.page must be >= 1, got 0"),
        (
            {"name": "streaming", "budget": 0.5},
            "policies[0]: budget comes from the study's budgets list; remove it here",
        ),
    ],
)
def test_policy_options_are_checked_up_front(tmp_path, policy, message) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "models": ["m"],
                "policies": [policy],
                "budgets": [0.5],
                "contexts": [128],
                "tasks": {"ppl": {}},
            }
        )
    )
    with pytest.raises(RecipeError) as err:
        load_study(path)
    assert message in str(err.value)


SHIPPED = sorted((Path(__file__).parents[2] / "tersa" / "recipes").glob("study-*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_studies_load(path: Path) -> None:
    study = load_study(path)
    assert cells(study)  # a non-empty grid
    for entry in study.quant:  # recipe paths resolve next to the study
        assert entry.recipe is None or Path(entry.recipe).is_file()


def test_shipped_studies_exist() -> None:
    assert [p.name for p in SHIPPED] == ["study-ratplus.yaml", "study-smollm2.yaml"]
