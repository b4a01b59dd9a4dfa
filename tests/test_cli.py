"""The CLI: each command on a tiny model, and every bad input ending in one message and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tersa.cli import main
from tersa.study import Cell
from tests.helpers import tiny_recipe, tiny_setup, write_recipe

W8A8 = {"quantize": {"weights": {"bits": 8}, "activations": {"bits": 8}}}


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    return tiny_setup(tmp_path)


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # rich wraps long lines on stderr


def test_run_writes_export_and_prints_summary(tmp_path, tiny, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(*tiny, [W8A8]))
    out = tmp_path / "out"
    code, stdout, _ = _run(["run", str(recipe), "--output", str(out), "--quiet"], capsys)
    assert code == 0
    assert "baseline" in stdout and "compressed" in stdout and f"wrote {out}" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("model", "baseline", "compressed", "stages", "wall_s", "peak_rss_bytes"):
        assert key in metrics
    assert {"ppl", "size_bytes"} <= set(metrics["baseline"])
    assert {"ppl", "size_bytes", "bits_per_param"} <= set(metrics["compressed"])
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "metrics.json",
        "model.safetensors",
        "recipe.yaml",
        "tokenizer.json",
    } <= names


def test_eval_prints_ppl_for_folder_and_export(tmp_path, tiny, capsys) -> None:
    model_dir, text = tiny
    code, stdout, _ = _run(
        [
            "eval",
            str(model_dir),
            "--data",
            str(text),
            "--seq-len",
            "32",
            "--max-windows",
            "3",
            "-q",
        ],
        capsys,
    )
    assert code == 0
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("ppl=") and "tokens=93 windows=3" in line
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model_dir, text, [W8A8]))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    capsys.readouterr()
    code, stdout2, _ = _run(
        [
            "eval",
            str(tmp_path / "out"),
            "--data",
            str(text),
            "--seq-len",
            "32",
            "--max-windows",
            "3",
            "-q",
        ],
        capsys,
    )
    assert code == 0 and stdout2.startswith("ppl=")


def test_inspect_shows_size_and_layers(tmp_path, tiny, capsys) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(
            *tiny,
            [{"quantize": {"weights": {"bits": 4, "granularity": "group", "group_size": 32}}}],
        ),
    )
    main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    capsys.readouterr()
    code, stdout, _ = _run(["inspect", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "w4-g32-sym" in stdout and "model.layers.1.mlp.down_proj" in stdout
    assert "bits_per_param=" in stdout.splitlines()[-1]


def test_stages_lists_fields(capsys) -> None:
    code, stdout, _ = _run(["stages"], capsys)
    assert code == 0 and "quantize" in stdout and "weights.group_size" in stdout


BAD_CASES = {
    "missing model path": (
        lambda t, m, x: tiny_recipe(t / "nowhere", x, [W8A8]),
        "does not exist",
    ),
    "recipe typo": (
        lambda t, m, x: {**tiny_recipe(m, x, [W8A8]), "evaluaton": {}},
        "evaluaton: unknown key 'evaluaton'; allowed:",
    ),
    "empty dataset": (
        lambda t, m, x: tiny_recipe(m, (t / "empty.txt"), [W8A8]),
        "empty",
    ),
    "sequence length above the maximum": (
        lambda t, m, x: {
            **tiny_recipe(m, x, [W8A8]),
            "evaluation": {"data": str(x), "seq_len": 4096},
        },
        "seq_len 4096 exceeds the model's maximum of 256 positions",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_recipe_inputs_exit_2_with_one_message(case, tmp_path, tiny, capsys) -> None:
    model_dir, text = tiny
    (tmp_path / "empty.txt").write_text("")
    make, expected = BAD_CASES[case]
    recipe = write_recipe(tmp_path / "r.yaml", make(tmp_path, model_dir, text))
    out = tmp_path / "out"
    code, _, stderr = _run(["run", str(recipe), "-o", str(out), "-q"], capsys)
    assert code == 2
    assert stderr.startswith("error: ") and expected in stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_corrupt_safetensors_and_unsupported_architecture(tmp_path, tiny, capsys) -> None:
    model_dir, text = tiny
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, _, stderr = _run(["eval", str(model_dir), "--data", str(text), "-q"], capsys)
    assert code == 2 and "model.safetensors" in stderr and "Traceback" not in stderr

    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gptj"
    (model_dir / "config.json").write_text(json.dumps(config))
    code, _, stderr = _run(["eval", str(model_dir), "--data", str(text), "-q"], capsys)
    assert (
        code == 2 and "unsupported model_type 'gptj'; tersa supports: bert, gpt2, llama" in stderr
    )


def test_export_of_an_unknown_version_exit_2(tmp_path, tiny, capsys) -> None:
    model_dir, text = tiny
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model_dir, text, [W8A8]))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["tersa"]["version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    for argv in (["eval", str(out), "--data", str(text), "-q"], ["inspect", str(out)]):
        code, _, stderr = _run(argv, capsys)
        assert code == 2 and "Traceback" not in stderr
        assert stderr == (
            f"error: '{out}' has tersa format version 99; this tersa reads versions 1 — "
            "upgrade tersa or re-export"
        )


def test_existing_output_without_overwrite(tmp_path, tiny, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(*tiny, [W8A8]))
    (tmp_path / "out").mkdir()
    code, _, stderr = _run(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == 2
    assert (
        stderr
        == f"error: output '{tmp_path / 'out'}' already exists; pass --overwrite or choose another folder"
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_cli_arguments_exit_2(tiny) -> None:
    model_dir, text = tiny
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tersa.cli",
            "eval",
            str(model_dir),
            "--data",
            str(text),
            "--seq-len",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "expected a positive integer, got 0" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_recipe_file_exit_2(tmp_path, capsys) -> None:
    code, _, stderr = _run(["run", str(tmp_path / "none.yaml")], capsys)
    assert (
        code == 2
        and stderr
        == f"error: recipe '{tmp_path / 'none.yaml'}' does not exist; give the path of a recipe YAML file"
    )


def test_run_resume_continues_from_the_work_area_and_refuses_a_changed_recipe(
    tmp_path, tiny, capsys
) -> None:
    qdrop = {"quantize": {"method": "qdrop", "weights": {"bits": 4}, "qdrop": {"iters": 2}}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(*tiny, [qdrop]))
    out = tmp_path / "out"
    area = tmp_path / ".out.work"
    area.mkdir()
    (area / "manifest.json").write_text('{"fingerprint": "another recipe"}')
    argv = ["run", str(recipe), "--output", str(out), "--quiet", "--resume"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and not out.exists()
    assert err == (
        f"error: --resume: the work area '{area}' was made by a different recipe (or model); "
        "rerun without --resume to start over"
    )
    code, stdout, _ = _run(argv[:-1], capsys)  # without --resume: the stale area is replaced
    assert code == 0 and f"wrote {out}" in stdout and not area.exists()


def _study_file(tmp_path: Path, **changes: object) -> Path:
    data = {
        "version": 1,
        "name": "toy",
        "models": ["m"],
        "policies": ["dense", {"name": "quest", "page": 16}],
        "budgets": [0.5],
        "contexts": [64],
        "tasks": {"needle": {"n": 1}},
        **changes,
    }
    return write_recipe(tmp_path / "study.yaml", data)


def test_study_rejects_an_unknown_key_and_a_bad_policy(tmp_path, capsys) -> None:
    study = _study_file(tmp_path, budget=[0.5])
    code, _, err = _run(["study", str(study)], capsys)
    assert code == 2 and err == (
        f"error: {study}: budget: unknown key 'budget'; allowed: version, name, models, dtype, "
        "quant, policies, budgets, contexts, tasks, seed, plot"
    )
    study = _study_file(tmp_path, policies=["dense", "h2o"])
    code, _, err = _run(["study", str(study)], capsys)
    assert code == 2 and err == (
        f"error: {study}: policies[1]: unknown policy 'h2o'; "
        "allowed: dense, streaming, snapkv, quest, moba"
    )
    assert not (tmp_path / "out").exists()


def test_study_runs_resumes_and_starts_fresh(tmp_path, capsys, monkeypatch) -> None:
    import types

    calls: list[str] = []

    def evaluate_cell(model, tokenizer, cell, tasks, seed) -> dict[str, float]:
        calls.append(cell.policy)
        if cell.policy == "interrupt":
            raise KeyboardInterrupt
        return {"kv_fraction_read": float(cell.budget), "needle_exact": 0.75}

    fake_cell = types.ModuleType("tersa.study.cell")
    fake_cell.evaluate_cell = evaluate_cell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tersa.study.cell", fake_cell)
    monkeypatch.setattr("tersa.study.run.default_build_model", lambda spec, entry, dtype: (1, 2))
    monkeypatch.chdir(tmp_path)
    study = _study_file(tmp_path)
    code, stdout, _ = _run(["study", str(study), "-q"], capsys)
    out = Path("out") / "toy"
    assert code == 0 and calls == ["dense", "quest"]
    assert "tersa study: toy" in stdout and "needle_exact" in stdout
    assert "2 cells run, 0 done earlier" in stdout
    assert f"wrote {out}: results.csv, results.md, pareto.png" in stdout
    assert {p.name for p in out.iterdir()} == {
        "study.yaml",
        "results.csv",
        "results.md",
        "pareto.png",
    }

    code, stdout, _ = _run(["study", str(study), "-q"], capsys)
    assert code == 0 and calls == ["dense", "quest"] and "0 cells run, 2 done earlier" in stdout
    code, stdout, _ = _run(["study", str(study), "-q", "--fresh"], capsys)
    assert code == 0 and len(calls) == 4 and "2 cells run, 0 done earlier" in stdout

    monkeypatch.setattr("tersa.study.run.cells", lambda s: [Cell("m", "fp", "interrupt", 1.0, 64)])
    code, _, err = _run(["study", str(study), "-q", "-o", "o2"], capsys)
    assert code == 130
    assert err == "interrupted; o2/results.csv keeps the finished cells: rerun to resume"
