"""QDrop on the embedded SmolLM2-135M: RTN, BRECQ-style (drop_prob 1.0), QDrop (0.5), OS+ → QDrop.

Usage: .venv/bin/python bench/qdrop.py [--rows rtn brecq qdrop osplus_qdrop]
                                       [--schemes w4a4 w3a8] [--max-windows 40]

Every cell is the shipped recipe ``qdrop-w4a4.yaml`` (or ``osplus-qdrop-w4a4.yaml``) with the
cell's method and bit widths: int weights in asymmetric groups of 128, per-token activations, 64
calibration sequences of 512 tokens, 100 steps of one sequence per block. Each cell runs in its own
process so its peak memory is its own. Printed per cell: perplexity on the Shakespeare evaluation
split (40 windows of 512 tokens), the quantization stage's wall time, the process's peak resident
memory after the stage, and the float model's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

console = Console(width=160)
RECIPES = Path(__file__).resolve().parent.parent / "tersa" / "recipes"
ROWS = ["rtn", "brecq", "qdrop", "osplus_qdrop"]
SCHEMES = {"w4a4": (4, 4), "w3a8": (3, 8)}


def cell_recipe(row: str, scheme: str, max_windows: int, baseline: bool) -> dict:
    """The shipped QDrop recipe turned into one cell of the table."""
    name = "osplus-qdrop-w4a4.yaml" if row == "osplus_qdrop" else "qdrop-w4a4.yaml"
    recipe = yaml.safe_load((RECIPES / name).read_text())
    recipe["evaluation"].update(max_windows=max_windows, baseline=baseline)
    quant = recipe["stages"][-1]["quantize"]
    quant["weights"]["bits"], quant["activations"]["bits"] = SCHEMES[scheme]
    if row == "rtn":
        quant["method"] = "rtn"
        del quant["qdrop"]
    elif row == "brecq":
        quant["qdrop"]["drop_prob"] = 1.0
    return recipe


def run_cell(row: str, scheme: str, max_windows: int, baseline: bool) -> dict:
    """Run one cell in this process; returns what the table needs."""
    from tersa.pipeline import run_recipe
    from tersa.recipe import parse_recipe

    recipe = parse_recipe(cell_recipe(row, scheme, max_windows, baseline))
    m = run_recipe(recipe, None).metrics
    stages = {s["name"]: s for s in m["stages"]}
    return {
        "ppl": m["compressed"]["ppl"],
        "fp_ppl": m["baseline"].get("ppl"),
        "stage_wall_s": {name: s["wall_s"] for name, s in stages.items()},
        "peak_after_quantize": stages["quantize"]["peak_rss_bytes"],
        "rss_before_quantize": stages["quantize"]["rss_before_bytes"],
        "model_bytes": m["baseline"]["size_bytes"],
        "wall_s": m["wall_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", choices=ROWS, default=ROWS)
    p.add_argument("--schemes", nargs="*", choices=list(SCHEMES), default=list(SCHEMES))
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--cell", nargs=2, metavar=("ROW", "SCHEME"), help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        cell = run_cell(*args.cell, args.max_windows, args.baseline)
        print("CELL " + json.dumps(cell), flush=True)
        return

    mib = 2**20
    table = Table(title="SmolLM2-135M, int weights g128 (asym) + per-token activations")
    for col in ("method", *args.schemes):
        table.add_column(col, justify="right" if col != "method" else "left")
    fp = None
    for row in args.rows:
        cells = []
        for scheme in args.schemes:
            if row == "osplus_qdrop" and scheme != "w4a4":
                cells.append("-")
                continue
            cmd = [sys.executable, __file__, "--cell", row, scheme]
            cmd += ["--max-windows", str(args.max_windows)] + ([] if fp else ["--baseline"])
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("CELL ")), None)
            if line is None:
                console.print(f"{row} {scheme} failed:\n{done.stderr[-3000:]}")
                cells.append("failed")
                continue
            c = json.loads(line[5:])
            fp = fp or c["fp_ppl"]
            walls = " + ".join(f"{w:.0f} s" for w in c["stage_wall_s"].values())
            peak = c["peak_after_quantize"] / mib
            cells.append(f"{c['ppl']:.2f} ({walls}, {peak:.0f} MiB)")
            console.print(
                f"{row} {scheme}: ppl {c['ppl']:.2f}, stages {c['stage_wall_s']}, "
                f"peak RSS after quantize {peak:.0f} MiB (before {c['rss_before_quantize'] / mib:.0f}"
                f" MiB), float model {c['model_bytes'] / mib:.0f} MiB, run {c['wall_s']:.0f} s"
            )
        table.add_row(row, *cells)
    table.caption = (
        f"FP32 perplexity {fp}; cell: perplexity (stage wall times on 2 CPU cores, "
        "peak resident memory of the process after quantize)"
    )
    console.print(table)


if __name__ == "__main__":
    main()
