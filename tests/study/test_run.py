"""The study loop with a fake builder and evaluator: files, resume, failures, atomic CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

from tersa.errors import ExportError
from tersa.study import (
    Cell,
    QuantEntry,
    cell_key,
    cells,
    default_build_model,
    load_study,
    run_study,
)
from tests.helpers import tiny_setup


def make_study(tmp_path: Path, **changes: Any):
    data: dict[str, Any] = {
        "version": 1,
        "name": "toy",
        "models": ["m1"],
        "quant": [{"name": "fp"}, {"name": "w8"}],
        "policies": ["dense", {"name": "quest", "page": 16}],
        "budgets": [0.25, 0.5],
        "contexts": [128],
        "tasks": {"needle": {"n": 2}, "ppl": {"windows": 1}},
    }
    data.update(changes)
    path = tmp_path / "study.in.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_study(path)


class Fake:
    """A builder and an evaluator that record their calls and fail where told."""

    def __init__(self, fail: set[str] = frozenset(), fail_build: set[str] = frozenset()) -> None:
        self.fail, self.fail_build = set(fail), set(fail_build)
        self.built: list[tuple[str, str]] = []
        self.evaluated: list[str] = []
        self.interrupt_at: int | None = None

    def build(self, spec: str, entry: QuantEntry, dtype: str) -> tuple[Any, Any]:
        self.built.append((spec, entry.name))
        if entry.name in self.fail_build:
            raise RuntimeError("no such recipe stage\nsecond line")
        return f"model:{spec}:{entry.name}", "tokenizer"

    def evaluate(self, model: Any, tokenizer: Any, cell: Cell, tasks: Any, seed: int) -> dict:
        assert model == f"model:{cell.model}:{cell.quant}" and tokenizer == "tokenizer"
        self.evaluated.append(cell_key(cell))
        if self.interrupt_at == len(self.evaluated):
            raise KeyboardInterrupt
        if cell_key(cell) in self.fail:
            raise ValueError("boom\ntraceback-ish detail")
        fraction = float(cell.budget)
        return {"kv_fraction_read": fraction, "needle_exact": fraction**0.5, "kv_bytes_read": 96}

    def run(self, study, output: Path, **kwargs: Any):
        return run_study(study, output, evaluate=self.evaluate, build_model=self.build, **kwargs)


def csv_rows(output: Path) -> list[dict[str, str]]:
    with open(output / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_csv_markdown_png_and_study(tmp_path) -> None:
    study, fake, out = make_study(tmp_path), Fake(), tmp_path / "out"
    result = fake.run(study, out)
    keys = [cell_key(c) for c in cells(study)]
    assert len(keys) == 2 * (1 + 2)
    assert fake.built == [("m1", "fp"), ("m1", "w8")]
    assert fake.evaluated == result.ran == keys
    assert result.skipped == [] and result.failed == [] and result.plot == out / "pareto.png"
    rows = csv_rows(out)
    assert list(rows[0]) == [
        *("model", "quant", "policy", "budget", "context", "options"),
        *("status", "error", "wall_s", "kv_bytes_read", "kv_fraction_read", "needle_exact"),
    ]
    assert [r["status"] for r in rows] == ["ok"] * 6
    assert rows[1]["options"] == '{"page":16}' and rows[1]["budget"] == "0.25"
    assert rows[1]["kv_fraction_read"] == "0.25" and rows[1]["kv_bytes_read"] == "96"
    assert float(rows[1]["wall_s"]) >= 0
    assert "## m1 · w8" in (out / "results.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert load_study(out / "study.yaml") == study  # the stored study runs as it is


def test_rerun_skips_finished_cells_and_retries_errors(tmp_path) -> None:
    study, out = make_study(tmp_path), tmp_path / "out"
    keys = [cell_key(c) for c in cells(study)]
    first = Fake(fail={keys[4]})
    first.run(study, out)
    assert [r["status"] for r in csv_rows(out)] == ["ok"] * 4 + ["error", "ok"]

    again = Fake()
    result = again.run(study, out)
    assert again.evaluated == [keys[4]]  # only the failed cell
    assert again.built == [("m1", "w8")]  # and only its build
    assert result.skipped == keys[:4] + keys[5:] and result.ran == [keys[4]]
    assert [r["status"] for r in csv_rows(out)] == ["ok"] * 6

    third = Fake()
    result = third.run(study, out)
    assert third.evaluated == [] and third.built == [] and len(result.skipped) == 6


def test_failing_cell_is_recorded_and_the_rest_go_on(tmp_path) -> None:
    study, out = make_study(tmp_path), tmp_path / "out"
    keys = [cell_key(c) for c in cells(study)]
    result = Fake(fail={keys[1]}).run(study, out)
    rows = csv_rows(out)
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "ok", "ok"]
    assert rows[1]["error"] == "ValueError: boom"
    assert rows[1]["needle_exact"] == "" and rows[2]["needle_exact"] != ""
    assert result.failed == [keys[1]]
    assert "| error |" in (out / "results.md").read_text()


def test_build_failure_marks_that_builds_cells(tmp_path) -> None:
    study, out = make_study(tmp_path), tmp_path / "out"
    fake = Fake(fail_build={"fp"})
    result = fake.run(study, out)
    rows = csv_rows(out)
    assert [(r["quant"], r["status"]) for r in rows] == [("fp", "error")] * 3 + [("w8", "ok")] * 3
    assert {r["error"] for r in rows[:3]} == {"build failed: RuntimeError: no such recipe stage"}
    assert len(fake.evaluated) == 3 and len(result.failed) == 3


def test_changed_tasks_are_refused_without_fresh(tmp_path) -> None:
    out = tmp_path / "out"
    Fake().run(make_study(tmp_path), out)
    changed = make_study(tmp_path, tasks={"needle": {"n": 3}, "ppl": {"windows": 1}}, seed=1)
    fake = Fake()
    with pytest.raises(ExportError) as e:
        fake.run(changed, out)
    assert str(e.value) == (
        f"'{out}' holds results measured with other tasks, seed "
        '(tasks was {"needle":{"n":2,"keys":4},"ppl":{"windows":1}}, '
        'now {"needle":{"n":3,"keys":4},"ppl":{"windows":1}}; seed was 0, now 1); '
        "they would not be comparable. Pass --fresh to discard them, or choose another --output"
    )
    assert fake.evaluated == [] and yaml.safe_load((out / "study.yaml").read_text())["seed"] == 0

    result = fake.run(changed, out, fresh=True)
    assert len(fake.evaluated) == 6 and result.skipped == []
    assert yaml.safe_load((out / "study.yaml").read_text())["seed"] == 1


def test_changed_grid_resumes_and_keeps_earlier_rows(tmp_path) -> None:
    out = tmp_path / "out"
    Fake().run(make_study(tmp_path), out)
    wider = make_study(tmp_path, quant=[{"name": "fp"}], budgets=[0.5, 0.125])
    fake = Fake()
    result = fake.run(wider, out)
    assert fake.evaluated == [cell_key(Cell("m1", "fp", "quest", 0.125, 128, {"page": 16}))]
    rows = csv_rows(out)
    # the wider study's cells first, in grid order; cells it dropped follow
    assert [(r["quant"], r["budget"]) for r in rows] == [
        ("fp", "1.0"),
        ("fp", "0.5"),
        ("fp", "0.125"),
        ("fp", "0.25"),
        ("w8", "1.0"),
        ("w8", "0.25"),
        ("w8", "0.5"),
    ]
    assert len(result.rows) == 7


def test_interrupt_keeps_exactly_the_finished_rows(tmp_path) -> None:
    study, out = make_study(tmp_path), tmp_path / "out"
    keys = [cell_key(c) for c in cells(study)]
    fake = Fake()
    fake.interrupt_at = 3
    with pytest.raises(KeyboardInterrupt):
        fake.run(study, out)
    rows = csv_rows(out)
    assert [r["model"] + "|" + r["quant"] + "|" + r["policy"] for r in rows] == [
        "m1|fp|dense",
        "m1|fp|quest",
    ]
    assert [r["budget"] for r in rows] == ["1.0", "0.25"]
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "study.yaml"]

    resumed = Fake()
    resumed.run(study, out)
    assert resumed.evaluated == keys[2:]


def test_refuses_a_folder_that_is_not_a_study(tmp_path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.safetensors").write_text("x")
    with pytest.raises(ExportError, match=r"holds no study\.yaml"):
        Fake().run(make_study(tmp_path), out)


def test_malformed_metrics_fail_the_cell(tmp_path) -> None:
    study, out = make_study(tmp_path, quant=[{"name": "fp"}], policies=["dense"]), tmp_path / "o"

    def evaluate(*args: Any) -> dict:
        return {"status": 1.0}

    run_study(study, out, evaluate=evaluate, build_model=Fake().build)
    (row,) = csv_rows(out)
    assert row["status"] == "error"
    assert row["error"] == "ValueError: metric names ['status'] clash with results.csv columns"


def test_default_builder_applies_the_recipe_to_the_studys_model(tmp_path) -> None:
    model_dir, _ = tiny_setup(tmp_path)
    recipe = tmp_path / "w8.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": "embedded:not-this-one",
                "dtype": "bfloat16",
                "device": "cpu",
                "stages": [{"quantize": {"weights": {"bits": 8}}}],
            }
        )
    )
    plain, tokenizer = default_build_model(str(model_dir), QuantEntry(name="fp"), "float32")
    quant, tokenizer2 = default_build_model(
        str(model_dir), QuantEntry(name="w8", recipe=str(recipe)), "float32"
    )
    assert type(tokenizer) is type(tokenizer2) and tokenizer2.pad_token is not None
    assert not quant.training
    kinds = {type(m).__name__ for m in plain.modules()}
    assert {type(m).__name__ for m in quant.modules()} != kinds  # the linears were swapped
    assert {p.dtype for p in quant.parameters() if p.is_floating_point()} == {
        next(plain.parameters()).dtype
    }
