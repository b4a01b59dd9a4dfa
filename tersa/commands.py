"""The CLI commands; each returns an exit code and raises TersaError for user errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tersa.progress import Reporter, console

# Piped output (files, CI logs) gets a fixed wide layout instead of rich's 80-column default, so
# module names are not cut.
stdout = Console() if sys.stdout.isatty() else Console(width=160)


def cmd_run(args: argparse.Namespace) -> int:
    from tersa.pipeline import run_recipe
    from tersa.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    output = Path(args.output) if args.output else Path("out") / Path(args.recipe).stem
    reporter = Reporter(quiet=args.quiet)
    result = run_recipe(
        recipe, output, overwrite=args.overwrite, reporter=reporter, resume=args.resume
    )
    stdout.print(summary_table(result.metrics))
    stdout.print(f"wrote {output}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tersa.kv.train import load_train_recipe, train

    recipe = load_train_recipe(args.recipe)
    output = Path(args.output) if args.output else Path("out") / Path(args.recipe).stem
    result = train(
        recipe, output, resume=args.resume, overwrite=args.overwrite, reporter=Reporter(args.quiet)
    )
    if result.metrics:  # process 0 of a DDP run, or a single process
        stdout.print(train_table(result.metrics))
        stdout.print(f"wrote {output}")
    return 0


def train_table(metrics: dict) -> Table:
    """Steps, tokens, time and the final losses of a training run."""
    table = Table(title=f"tersa train: {metrics['attention']}, {metrics['params']:,} parameters")
    table.add_column("")
    table.add_column("value", justify="right")
    last = metrics["log"][-1] if metrics["log"] else {}
    rows = [
        ("steps", f"{metrics['steps']:,}"),
        ("tokens", f"{metrics['tokens']:,}"),
        ("time", f"{metrics['wall_s']:.1f} s, training {metrics['train_s']:.1f} s"),
        ("training speed", f"{metrics['tokens_per_s']:.0f} tokens/s"),
        ("last train loss", f"{last['loss']:.4f}" if last else "-"),
    ]
    if "loss_sparse" in last:
        rows.append(("last train loss, joint sparse step", f"{last['loss_sparse']:.4f}"))
    for name, value in metrics["eval"].items():
        if isinstance(value, float):  # nll_dense, nll_joint, nll_adapt
            rows.append((f"held-out {name.replace('_', ' ')}", f"{value:.4f}"))
    for row in rows:
        table.add_row(*row)
    return table


def summary_table(metrics: dict) -> Table:
    """Baseline vs compressed (perplexity, size, bits per parameter), then each stage's time."""
    base, comp = metrics["baseline"], metrics["compressed"]
    table = Table(title=f"tersa run: {metrics['model']}")
    for col in ("", "perplexity", "size", "bits/param", "time"):
        table.add_column(col, justify="right" if col else "left")
    for label, m in (("baseline", base), ("compressed", comp)):
        ppl = f"{m['ppl']:.2f}" if "ppl" in m else "-"
        bpp = f"{8 * m['size_bytes'] / base['params']:.2f}"
        table.add_row(label, ppl, _mib(m["size_bytes"]), bpp, "")
    for stage in metrics["stages"]:
        table.add_row(f"stage {stage['name']}", "", "", "", f"{stage['wall_s']:.1f} s")
    table.add_row("total", "", "", "", f"{metrics['wall_s']:.1f} s")
    table.caption = f"peak memory {_mib(metrics['peak_rss_bytes'])}"
    return table


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_eval(args: argparse.Namespace) -> int:
    from tersa.data.sources import load_text
    from tersa.data.tokens import eval_windows, tokenize_text
    from tersa.eval.ppl import check_causal, check_seq_len, perplexity
    from tersa.loading import open_model
    from tersa.sysinfo import resolve_device

    dtype = getattr(torch, args.dtype)
    device = resolve_device(args.device, dtype)
    model, tokenizer, _ = open_model(args.model, dtype=dtype)
    check_causal(model.config)
    check_seq_len(model.config, args.seq_len)
    split = args.split or ("evaluation" if args.data.startswith("embedded:") else None)
    ids = tokenize_text(tokenizer, load_text(args.data, split, args.text_field))
    windows = eval_windows(ids, args.seq_len, args.max_windows, spread=args.spread)
    model.to(device)
    reporter = Reporter(quiet=args.quiet)
    with reporter.task("perplexity", windows.shape[0]) as update:
        result = perplexity(model, windows, batch_size=args.batch_size, progress=update)
    print(f"ppl={result.ppl:.4f} tokens={result.tokens} windows={result.windows}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from tersa.study import load_study, run_study
    from tersa.study.report import summary_table

    study = load_study(args.study)
    output = Path(args.output) if args.output else Path("out") / str(study.name)
    try:
        result = run_study(study, output, Reporter(quiet=args.quiet), fresh=args.fresh)
    except KeyboardInterrupt:
        console.print(
            f"interrupted; {output / 'results.csv'} keeps the finished cells: rerun to resume"
        )
        return 130
    assert study.plot.y is not None
    table = summary_table(result.rows, study.plot.x, study.plot.y, f"tersa study: {study.name}")
    failed = f", {len(result.failed)} with errors" if result.failed else ""
    table.caption = f"{len(result.ran)} cells run, {len(result.skipped)} done earlier{failed}"
    stdout.print(table)
    files = ["results.csv", "results.md", *(["pareto.png"] if result.plot else [])]
    stdout.print(f"wrote {output}: {', '.join(files)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tersa.export.inspect import inspect_folder

    info = inspect_folder(args.folder)
    table = Table(title=f"{info.folder} ({info.model_type})")
    for col, justify in (("module", "left"), ("kind", "left"), ("params", "right"),
                         ("bytes", "right"), ("bits/param", "right")):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in info.rows:
        table.add_row(
            row.name, row.kind, f"{row.params:,}", f"{row.bytes:,}", f"{row.bits_per_param:.2f}"
        )
    stdout.print(table)
    if info.tensors:  # a lossless export: how each tensor is coded
        coded = Table(title="lossless container (model.tersa)")
        for col, justify in (("tensor", "left"), ("dtype", "left"), ("shape", "left"),
                             ("coder", "left"), ("bytes", "right"), ("bits/param", "right")):  # fmt: skip
            coded.add_column(col, justify=justify)  # type: ignore[arg-type]
        for t in info.tensors:
            shape = "×".join(map(str, t.shape)) or "scalar"
            coded.add_row(
                t.name, t.dtype, shape, t.coder, f"{t.stored_bytes:,}", f"{t.bits_per_param:.2f}"
            )
        stdout.print(coded)
    bpp = 8 * info.size_bytes / info.params if info.params else 0.0
    print(
        f"size={info.size_bytes} bytes ({_mib(info.size_bytes)}) params={info.params} bits_per_param={bpp:.3f}"
    )
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from tersa.recipe import config_fields
    from tersa.registry import stages

    for name, stage in stages().items():
        table = Table(title=f"{name}: {stage.doc}", title_justify="left")
        for col in ("field", "type", "default", "description"):
            table.add_column(col)
        for field, typ, default, desc in config_fields(stage.config):
            table.add_row(field, typ, repr(default), desc)
        stdout.print(table)
    return 0


__all__ = ["cmd_eval", "cmd_inspect", "cmd_run", "cmd_stages", "cmd_study", "cmd_train", "console"]
