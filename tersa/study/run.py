"""The study loop: build each (model, quant) once, evaluate its cells, keep results.csv current.

results.csv is rewritten atomically after every cell, so an interrupted study loses at most the
cell that was running; rerunning it with the same output skips the finished cells and retries the
failed ones. study.yaml records the settings the numbers depend on, so a rerun with other tasks,
seed or dtype is refused instead of mixing incomparable rows.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tersa.errors import ExportError, TersaError
from tersa.progress import Reporter
from tersa.study.grid import CELL_COLUMNS, cell_key, cell_row, cells, row_key
from tersa.study.report import (
    STATUS_COLUMNS,
    Row,
    plot_pareto,
    read_csv,
    write_csv,
    write_markdown,
)
from tersa.study.schema import Cell, QuantEntry, StudyConfig, TasksConfig

Evaluate = Callable[[nn.Module, Any, Cell, TasksConfig, int], dict[str, float]]
BuildModel = Callable[[str, QuantEntry, str], tuple[nn.Module, Any]]

STUDY_FILE = "study.yaml"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PARETO_PNG = "pareto.png"
# Rows measured under different values of these are not comparable.
_COMPARABLE = ("tasks", "seed", "dtype")


@dataclass
class StudyResult:
    """What a run did; ``rows`` is results.csv as written (grid order)."""

    output: Path
    rows: list[Row] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)  # keys evaluated (or built and failed) now
    skipped: list[str] = field(default_factory=list)  # keys an earlier run finished
    failed: list[str] = field(default_factory=list)  # keys whose status is error after this run
    plot: Path | None = None


def run_study(
    study: StudyConfig,
    output: Path,
    reporter: Reporter | None = None,
    evaluate: Evaluate | None = None,
    build_model: BuildModel | None = None,
    fresh: bool = False,
) -> StudyResult:
    """Run every cell of ``study`` not finished in ``output``; write results.csv/.md, pareto.png.

    :param evaluate: ``(model, tokenizer, cell, tasks, seed) -> metrics`` (default:
        :func:`tersa.study.cell.evaluate_cell`).
    :param build_model: ``(model_spec, quant_entry, dtype) -> (model, tokenizer)`` (default:
        :func:`default_build_model`).
    :param fresh: discard the results in ``output`` instead of resuming them.
    :raises ExportError: ``output`` is not a study folder, or holds incomparable results.
    """
    results = _Results.open(study, output, fresh)
    grid = cells(study)
    result = StudyResult(output, skipped=[cell_key(c) for c in grid if results.done(c)])
    todo = [c for c in grid if not results.done(c)]
    loop = _Loop(
        study,
        evaluate or (_default_evaluate() if todo else _unused),
        build_model or default_build_model,
        results,
        result,
        reporter or Reporter(quiet=True),
    )
    loop.run(todo, len(grid))
    result.rows = results.ordered()
    result.failed = [row_key(r) for r in result.rows if r["status"] != "ok"]
    write_markdown(result.rows, output / RESULTS_MD, title=f"tersa study: {study.name}")
    assert study.plot.y is not None  # load_study fills in the default
    png = output / PARETO_PNG
    if plot_pareto(result.rows, study.plot.x, study.plot.y, png, title=str(study.name)):
        result.plot = png
    else:  # no finished cell to plot: an old picture would claim otherwise
        png.unlink(missing_ok=True)
    return result


def _default_evaluate() -> Evaluate:
    from tersa.study.cell import evaluate_cell

    return evaluate_cell


def _unused(*args: Any) -> dict[str, float]:
    raise AssertionError("no cell left to evaluate")


@dataclass
class _Loop:
    study: StudyConfig
    evaluate: Evaluate
    build_model: BuildModel
    results: _Results
    result: StudyResult
    reporter: Reporter
    todo: int = 0  # cells this run evaluates, for the progress bar
    update: Callable[..., None] = field(default=lambda *a, **k: None, init=False)

    def run(self, todo: list[Cell], total: int) -> None:
        if self.result.skipped:
            self.reporter.info(
                f"{len(self.result.skipped)} of {total} cells finished in an earlier run; "
                "skipping them"
            )
        if not todo:
            return
        entries = {q.name: q for q in self.study.quant}
        self.todo = len(todo)
        with self.reporter.task(f"study {self.study.name}", len(todo)) as update:
            self.update = update
            # cells() keeps each (model, quant) together, so each is built once.
            for (spec, quant), group in itertools.groupby(todo, lambda c: (c.model, c.quant)):
                self.run_group(spec, entries[quant], list(group))

    def run_group(self, spec: str, entry: QuantEntry, group: list[Cell]) -> None:
        count = f"{len(group)} cell{'s' if len(group) > 1 else ''}"
        self.reporter.info(f"building {spec} · {entry.name} for {count}")
        try:
            model, tokenizer = self.build_model(spec, entry, self.study.dtype)
        except Exception as e:
            message = f"build failed: {_message(e)}"
            self.reporter.info(f"{spec} · {entry.name}: {message}")
            for cell in group:
                self.results.record(cell, "error", message, "", {})
                self.step(cell)
            self.results.save()
            return
        try:
            for cell in group:
                self.run_cell(model, tokenizer, cell)
        finally:
            del model, tokenizer
            _free_memory()

    def run_cell(self, model: nn.Module, tokenizer: Any, cell: Cell) -> None:
        self.update(len(self.result.ran), self.todo, note=_note(cell))
        started = time.perf_counter()
        try:
            metrics = self.evaluate(model, tokenizer, cell, self.study.tasks, self.study.seed)
            texts = _metric_texts(metrics)
        except Exception as e:
            status, error, texts = "error", _message(e), {}
            self.reporter.info(f"{cell_key(cell)}: {error}")
        else:
            status, error = "ok", ""
        wall = f"{time.perf_counter() - started:.3f}"
        self.results.record(cell, status, error, wall, texts)
        self.results.save()
        self.step(cell)

    def step(self, cell: Cell) -> None:
        self.result.ran.append(cell_key(cell))
        self.update(len(self.result.ran), self.todo, note=_note(cell))


def _note(cell: Cell) -> str:
    return f"{cell.model} · {cell.quant} · {cell.policy} b={cell.budget} ctx={cell.context}"


def _metric_texts(metrics: dict[str, float]) -> dict[str, str]:
    """The evaluator's metrics as CSV text; a malformed result fails the cell, not the study."""
    if not isinstance(metrics, dict):
        raise TypeError(f"the evaluator returned {type(metrics).__name__}, not a dict of metrics")
    clash = set(metrics) & {*CELL_COLUMNS, *STATUS_COLUMNS}
    if clash:
        raise ValueError(f"metric names {sorted(clash)} clash with results.csv columns")
    return {
        str(k): str(v) if isinstance(v, int) and not isinstance(v, bool) else repr(float(v))
        for k, v in metrics.items()
    }


def _message(e: BaseException) -> str:
    """The first line of the error; with its type unless it is a TersaError (already worded)."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(e, TersaError) and first:
        return first
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _free_memory() -> None:
    gc.collect()  # modules hold reference cycles (hooks, tied weights)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Results:
    """results.csv: every row written so far, by key, kept in grid order on disk."""

    path: Path
    order: dict[str, int]
    rows: dict[str, Row]

    @classmethod
    def open(cls, study: StudyConfig, output: Path, fresh: bool) -> _Results:
        _prepare_output(study, output, fresh)
        path = output / RESULTS_CSV
        rows = _read_rows(path) if path.exists() else {}
        order = {cell_key(c): i for i, c in enumerate(cells(study))}
        return cls(path, order, rows)

    def done(self, cell: Cell) -> bool:
        return self.rows.get(cell_key(cell), {}).get("status") == "ok"

    def record(
        self, cell: Cell, status: str, error: str, wall_s: str, metrics: dict[str, str]
    ) -> None:
        row = cell_row(cell) | {"status": status, "error": error, "wall_s": wall_s}
        self.rows[cell_key(cell)] = row | metrics

    def ordered(self) -> list[Row]:
        """Grid order; rows of cells no longer in the study (kept: they cost compute and are
        comparable) follow in their earlier order."""
        last = len(self.order)
        return sorted(self.rows.values(), key=lambda r: self.order.get(row_key(r), last))

    def save(self) -> None:
        write_csv(self.ordered(), self.path)


def _prepare_output(study: StudyConfig, output: Path, fresh: bool) -> None:
    """Refuse a folder that is not this study's; clear it on ``fresh``; write study.yaml."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"output '{output}' exists and is not a folder; choose another path")
    stored = output / STUDY_FILE
    ours = stored.exists() or (output / RESULTS_CSV).exists()
    if output.is_dir() and not ours and any(output.iterdir()):
        raise ExportError(
            f"output '{output}' is not empty and holds no {STUDY_FILE}, so it is not a study's "
            "folder; choose another --output"
        )
    if fresh:
        for name in (RESULTS_CSV, RESULTS_MD, PARETO_PNG):
            (output / name).unlink(missing_ok=True)
    elif stored.exists():
        _check_comparable(stored, study)
    output.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(study.to_dict(), sort_keys=False)
    tmp = stored.with_name(f".{STUDY_FILE}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(stored)


def _check_comparable(stored: Path, study: StudyConfig) -> None:
    try:
        old = yaml.safe_load(stored.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ExportError(f"cannot read '{stored}' ({e}); pass --fresh to start over") from None
    old = old if isinstance(old, dict) else {}
    new = study.to_dict()
    changed = [k for k in _COMPARABLE if old.get(k) != new[k]]
    if changed:
        what = "; ".join(f"{k} was {_compact(old.get(k))}, now {_compact(new[k])}" for k in changed)
        raise ExportError(
            f"'{stored.parent}' holds results measured with other {', '.join(changed)} ({what}); "
            "they would not be comparable. Pass --fresh to discard them, or choose another --output"
        )


def _compact(value: Any) -> str:
    if isinstance(value, dict):  # tasks: leave out the sections that are not run
        value = {k: v for k, v in value.items() if v is not None}
    return json.dumps(value, separators=(",", ":"))


def _read_rows(path: Path) -> dict[str, Row]:
    try:
        return {row_key(r): r for r in read_csv(path)}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(
            f"'{path}' is not a study's results file ({e}); pass --fresh to start over"
        ) from None


def default_build_model(
    model_spec: str, entry: QuantEntry, dtype: str
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """``open_model`` for ``recipe: null``; otherwise the recipe's stages applied to the study's
    model in the study's dtype (its own ``model`` and ``dtype`` are overridden). Either way the
    model ends on the device the recipe (or ``auto``) picks, in eval mode."""
    from tersa.loading import open_model
    from tersa.pipeline import apply_stages
    from tersa.recipe import load_recipe
    from tersa.sysinfo import resolve_device

    torch_dtype = getattr(torch, dtype)
    if entry.recipe is None:
        model, tokenizer, _ = open_model(model_spec, dtype=torch_dtype)
        return model.to(resolve_device("auto", torch_dtype)).eval(), tokenizer
    recipe = dataclasses.replace(load_recipe(entry.recipe), model=model_spec, dtype=dtype)
    model = apply_stages(recipe)
    return model.eval(), _tokenizer(model_spec)


def _tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer ``open_model(spec)`` returns, read from the model's folder: apply_stages
    loads the model but returns no tokenizer, and loading the weights twice would be waste."""
    from tersa.export.load import is_tersa_export
    from tersa.kv.train.trained import TRAINED_PREFIX, is_ratplus_folder, resolve_trained
    from tersa.models.load import resolve_spec

    trained = spec.startswith(TRAINED_PREFIX)
    folder = resolve_trained(spec) if trained else resolve_spec(spec)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # open_model sets a pad token only for plain HF folders (tersa.models.load.load_model)
    plain_hf = spec.startswith("embedded:") or not (
        is_ratplus_folder(folder) or is_tersa_export(folder)
    )
    if plain_hf and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
