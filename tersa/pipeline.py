"""Run a recipe: load, baseline, stages in order, evaluate, export atomically, report."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from tersa.context import StageContext
from tersa.data.sources import load_text
from tersa.data.tokens import calibration_samples, eval_windows, tokenize_text
from tersa.errors import ExportError, RecipeError
from tersa.eval.ppl import check_causal, check_seq_len, perplexity
from tersa.export.format import METRICS_FILE, RECIPE_FILE
from tersa.export.save import save_export, tensor_bytes, unique_state_dict
from tersa.loading import open_model
from tersa.models.adapters import get_adapter
from tersa.offload import offloaded
from tersa.progress import Reporter
from tersa.recipe import Recipe
from tersa.registry import get_stage
from tersa.sysinfo import current_rss_bytes, peak_rss_bytes, resolve_device
from tersa.workarea import fingerprint, open_work_area, work_area


@dataclass
class RunResult:
    """What a run measured; ``metrics`` is what ``metrics.json`` holds."""

    output: Path | None
    model: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)


def check_output(output: Path, overwrite: bool, model_spec: str) -> None:
    """Refuse an existing output (unless ``overwrite``) or one that would replace the input."""
    model_path = Path(model_spec).resolve()
    if not model_spec.startswith("embedded:") and (
        output.resolve() == model_path or model_path.is_relative_to(output.resolve())
    ):
        raise ExportError(
            f"output '{output}' would overwrite the input model; choose another folder"
        )
    check_output_folder(output, overwrite)


def check_output_folder(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``, and one that is not a folder."""
    if output.exists() and not overwrite:
        raise ExportError(
            f"output '{output}' already exists; pass --overwrite or choose another folder"
        )
    if output.exists() and not output.is_dir():
        raise ExportError(f"output '{output}' exists and is not a folder; choose another path")


def run_recipe(
    recipe: Recipe,
    output: Path | None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    recipe_text: str | None = None,
    resume: bool = False,
) -> RunResult:
    """Run ``recipe``; write the export into ``output`` (atomically) unless it is None.

    With an output, long stages keep finished pieces in the work area next to it (see
    :mod:`tersa.workarea`); ``resume`` reuses them after a crash. The area is deleted once the
    export is written.
    """
    reporter = reporter or Reporter(quiet=True)
    workdir = None
    if output is not None:
        check_output(output, overwrite, recipe.model)
    started = time.perf_counter()
    run = _Run.start(recipe, reporter)
    if output is not None:
        workdir = open_work_area(work_area(output), fingerprint(recipe.to_dict()), resume)
        run.ctx.workdir, run.ctx.resume = workdir, resume
    model = run.model
    metrics: dict[str, Any] = {
        "model": recipe.model,
        "dtype": recipe.dtype,
        "device": str(run.ctx.device),
    }
    n_params = sum(t.numel() for t in unique_state_dict(model).values() if t.is_floating_point())
    baseline: dict[str, Any] = {
        "size_bytes": tensor_bytes(unique_state_dict(model)),
        "params": n_params,
    }
    if run.eval_ids is not None and recipe.evaluation and recipe.evaluation.baseline:
        baseline.update(_evaluate(run, reporter, "baseline"))
    metrics["baseline"] = baseline

    metrics["stages"] = run.apply_stages()
    model = run.model
    compressed: dict[str, Any] = {}
    if run.eval_ids is not None:
        compressed.update(_evaluate(run, reporter, "compressed"))
    compressed["size_bytes"] = tensor_bytes(unique_state_dict(model))
    compressed["bits_per_param"] = round(8 * compressed["size_bytes"] / n_params, 4)
    metrics["compressed"] = compressed
    metrics["wall_s"] = round(time.perf_counter() - started, 3)  # everything but writing files
    metrics["peak_rss_bytes"] = peak_rss_bytes()
    if output is not None:
        _write_output(model, run.tokenizer, recipe, output, overwrite, metrics)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    return RunResult(output, model, metrics)


def apply_stages(recipe: Recipe, reporter: Reporter | None = None) -> nn.Module:
    """Load the recipe's model and apply its stages; no evaluation, nothing written."""
    run = _Run.start(recipe, reporter or Reporter(quiet=True), evaluation=False)
    run.apply_stages()
    return run.model


@dataclass
class _Run:
    """A loaded model with its tokenizer, tokenized data and stage context."""

    recipe: Recipe
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    ctx: StageContext
    eval_ids: torch.Tensor | None

    @classmethod
    def start(cls, recipe: Recipe, reporter: Reporter, evaluation: bool = True) -> _Run:
        torch.manual_seed(0)
        dtype = getattr(torch, recipe.dtype)
        device = resolve_device(recipe.device, dtype)
        model, tokenizer, _ = open_model(recipe.model, dtype=dtype)
        if not recipe.offload:
            model.to(device)
        adapter = get_adapter(model)
        calib_ids, eval_ids = _prepare_data(recipe, tokenizer, model, evaluation)
        ctx = StageContext(
            adapter=adapter,
            device=device,
            reporter=reporter,
            calibration_ids=calib_ids,
            batch_size=recipe.calibration.batch_size if recipe.calibration else 8,
            recipe=recipe,
        )
        return cls(recipe, model, tokenizer, ctx, eval_ids)

    def apply_stages(self) -> list[dict[str, Any]]:
        """Run the stages in order; returns ``[{"name", "wall_s"}]``."""
        self.model, timings = apply_stage_list(self.model, self.recipe.stages, self.ctx)
        return timings


def apply_stage_list(
    model: nn.Module, stage_list: list[tuple[str, Any]], ctx: StageContext
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Apply ``[(name, config)]`` in order with ``ctx``; returns the model and, per stage, its
    wall time, the resident memory before it and the process's peak resident memory after it
    (the peak so far: the stage's own peak unless an earlier step peaked higher), plus
    ``metrics`` when the stage reported any (``ctx.metrics``)."""
    timings = []
    for index, (name, cfg) in enumerate(stage_list):
        rss_before = current_rss_bytes()
        t0 = time.perf_counter()
        ctx.stage_name, ctx.stage_index, ctx.metrics = name, index, {}
        model = get_stage(name).fn(model, cfg, ctx)
        timing: dict[str, Any] = {
            "name": name,
            "wall_s": round(time.perf_counter() - t0, 3),
            "rss_before_bytes": rss_before,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if ctx.metrics:
            timing["metrics"] = ctx.metrics
        timings.append(timing)
    return model, timings


def _prepare_data(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: nn.Module, evaluation: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Tokenize calibration and evaluation text up front so bad data fails before any work."""
    needs_calibration = any(getattr(cfg, "needs_calibration", False) for _, cfg in recipe.stages)
    calib_ids = eval_ids = None
    cal = recipe.calibration
    if needs_calibration and cal is None:
        raise RecipeError("a stage needs calibration data; add a 'calibration' section")
    if cal is not None and needs_calibration:
        check_seq_len(model.config, cal.seq_len)
        text = load_text(
            cal.data, cal.split or _default_split(cal.data, "calibration"), cal.text_field
        )
        calib_ids = calibration_samples(
            tokenize_text(tokenizer, text), cal.samples, cal.seq_len, cal.seed
        )
    ev = recipe.evaluation
    if ev is not None and evaluation:
        check_causal(model.config)
        check_seq_len(model.config, ev.seq_len)
        text = load_text(ev.data, ev.split or _default_split(ev.data, "evaluation"), ev.text_field)
        eval_ids = eval_windows(
            tokenize_text(tokenizer, text), ev.seq_len, ev.max_windows, ev.spread
        )
    return calib_ids, eval_ids


def _default_split(data: str, split: str) -> str | None:
    return split if data.startswith("embedded:") else None


def _evaluate(run: _Run, reporter: Reporter, label: str) -> dict[str, Any]:
    """Perplexity of the run's model; through offload hooks when the weights stay on the CPU."""
    evaluation, device = run.recipe.evaluation, run.ctx.device
    assert evaluation is not None and run.eval_ids is not None
    offload = offloaded(run.model, device) if run.recipe.offload else nullcontext()
    with offload, reporter.task(f"perplexity ({label})", run.eval_ids.shape[0]) as update:
        result = perplexity(
            run.model,
            run.eval_ids,
            batch_size=evaluation.batch_size,
            device=device,
            progress=update,
        )
    return {"ppl": round(result.ppl, 4), "eval_tokens": result.tokens}


def _write_output(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    output: Path,
    overwrite: bool,
    metrics: dict[str, Any],
) -> None:
    """Write everything into a temp folder next to ``output``, then rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        if recipe.export.model:
            save_export(model, tmp, lossless=recipe.export.lossless)
        if recipe.export.tokenizer:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        _replace_folder(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(tmp: Path, output: Path, overwrite: bool) -> None:
    if not output.exists():
        tmp.rename(output)
        return
    if not overwrite:
        raise ExportError(f"output '{output}' appeared while running; pass --overwrite")
    old = output.with_name(f".{output.name}.old-{time.time_ns()}")
    output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
