"""L2 at 10x on the embedded SmolLM2-135M against round-to-nearest at about the same size.

Usage: .venv/bin/python bench/l2.py [--rows l2 l2_init rtn_w3 rtn_w4] [--max-windows 40]

Rows (each cell runs in its own process):

- ``l2``: the shipped recipe ``l2-x10.yaml`` (3.2 bits per weight after entropy coding);
- ``l2_init``: the same grid without training (``rounds: 1``, no steps): per tensor the uniform
  quantizer whose codes have the target entropy, i.e. entropy-coded RTN at exactly L2's size;
- ``rtn_w3`` / ``rtn_w4``: weight-only RTN, asymmetric groups of 128 (``rtn-w4a16-g128.yaml`` at 3
  and 4 bits).

Sizes are over the decoder-block linears (the part every row compresses; embeddings, norms and the
tied LM head are float32 in all rows), in bits per weight: ``entropy`` is the empirical entropy of
each tensor's codes (what a static per-tensor entropy coder reaches, tables excluded) plus the side
tensors as stored (RTN: a float32 scale and an int8 zero point per group of 128; L2: e and Δ per
layer); ``coded`` is what tersa's lossless container (``export: {lossless: true}``,
:mod:`tersa.compress.lossless`) actually stores for those tensors, when that coder is installed.
Perplexity: the Shakespeare evaluation split, 40 windows of 512 tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from torch import nn

console = Console(width=160)
RECIPES = Path(__file__).resolve().parent.parent / "tersa" / "recipes"
ROWS = ["l2", "l2_init", "rtn_w3", "rtn_w4"]
LOSSLESS = importlib.util.find_spec("tersa.compress.lossless") is not None


def cell_recipe(row: str, max_windows: int, baseline: bool) -> dict:
    """The recipe of one row."""
    name = "l2-x10.yaml" if row.startswith("l2") else "rtn-w4a16-g128.yaml"
    recipe = yaml.safe_load((RECIPES / name).read_text())
    recipe["evaluation"].update(max_windows=max_windows, baseline=baseline)
    stage = recipe["stages"][0]
    if row == "l2_init":
        stage["l2"].update(rounds=1, transform_iters=0, reconstruct_iters=0)
    elif row == "rtn_w3":
        stage["quantize"]["weights"]["bits"] = 3
    return recipe


def layer_sizes(model: nn.Module) -> tuple[dict[str, int], float, float]:
    """``{layer: weights}`` of the compressed layers, their codes' entropy bits and side bits."""
    from tersa.compress.l2.layer import L2Linear
    from tersa.compress.l2.rate import empirical_entropy
    from tersa.quant.qlinear import QuantLinear

    sizes, code_bits, side_bits = {}, 0.0, 0.0
    for name, m in model.named_modules():
        if isinstance(m, L2Linear):
            codes, side = m.weight_codes, [m.edge, m.step]
        elif isinstance(m, QuantLinear) and m.weights is not None:
            codes = m._codes()
            side = [
                t for t in (m.weight_scale, getattr(m, "weight_zero_point", None)) if t is not None
            ]
        else:
            continue
        sizes[name] = codes.numel()
        code_bits += empirical_entropy(codes) * codes.numel()
        side_bits += sum(8 * t.numel() * t.element_size() for t in side)
    return sizes, code_bits, side_bits


def coded_bits(folder: Path, sizes: dict[str, int]) -> tuple[float, int]:
    """Bits the container stores for the layers ``sizes`` names (biases included), and its
    total size in bytes."""
    from tersa.compress.lossless import read_index
    from tersa.export.format import LOSSLESS_FILE

    infos, _ = read_index(folder / LOSSLESS_FILE)
    ours = sum(8 * t.stored_bytes for t in infos if t.name.rpartition(".")[0] in sizes)
    return ours, (folder / LOSSLESS_FILE).stat().st_size


def run_cell(row: str, max_windows: int, baseline: bool) -> dict:
    """Run one row in this process; returns what the table needs."""
    from tersa.export.save import save_export
    from tersa.pipeline import run_recipe
    from tersa.recipe import parse_recipe

    result = run_recipe(parse_recipe(cell_recipe(row, max_windows, baseline)), None)
    sizes, code_bits, side_bits = layer_sizes(result.model)
    n = sum(sizes.values())
    cell = {
        "ppl": result.metrics["compressed"]["ppl"],
        "fp_ppl": result.metrics["baseline"].get("ppl"),
        "entropy_bpw": code_bits / n,
        "side_bpw": side_bits / n,
        "weights": n,
        "stage_wall_s": {s["name"]: s["wall_s"] for s in result.metrics["stages"]},
        "wall_s": result.metrics["wall_s"],
    }
    if LOSSLESS:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                save_export(result.model, Path(tmp), lossless=True)
            except Exception as e:  # the coder is optional here: keep the row, say why
                cell["coded_error"] = f"{type(e).__name__}: {e}"[:300]
            else:
                bits, total = coded_bits(Path(tmp), sizes)
                cell.update(coded_bpw=bits / n, file_mib=total / 2**20)
    return cell


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", choices=ROWS, default=ROWS)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--cell", metavar="ROW", help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(
            "CELL " + json.dumps(run_cell(args.cell, args.max_windows, args.baseline)), flush=True
        )
        return

    table = Table(title="SmolLM2-135M: L2 at 10x against RTN (decoder-block linears)")
    for col in ("row", "ppl", "entropy + side bits/w", "coded bits/w", "file MiB", "stage s"):
        table.add_column(col, justify="left" if col == "row" else "right")
    fp, weights = None, 0
    for row in args.rows:
        cmd = [sys.executable, __file__, "--cell", row, "--max-windows", str(args.max_windows)]
        done = subprocess.run(cmd + ([] if fp else ["--baseline"]), capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("CELL ")), None)
        if line is None:
            console.print(f"{row} failed:\n{done.stderr[-3000:]}")
            table.add_row(row, "failed", "", "", "", "")
            continue
        c = json.loads(line[5:])
        fp, weights = fp or c["fp_ppl"], c["weights"]
        console.print(f"{row}: {json.dumps(c)}")
        coded = f"{c['coded_bpw']:.3f}" if "coded_bpw" in c else c.get("coded_error", "-")[:40]
        table.add_row(
            row,
            f"{c['ppl']:.2f}",
            f"{c['entropy_bpw']:.3f} + {c['side_bpw']:.3f}",
            coded,
            f"{c['file_mib']:.1f}" if "file_mib" in c else "-",
            " + ".join(f"{w:.0f}" for w in c["stage_wall_s"].values()),
        )
    table.caption = (
        f"FP32 perplexity {fp}; bits per weight of the {weights:,} block-linear weights "
        "(entropy: empirical, per tensor; coded: tersa's lossless container); file: whole model "
        "(float32 embeddings included); stage wall time on 2 shared CPU cores"
    )
    console.print(table)


if __name__ == "__main__":
    main()
