"""Structured FFN on the embedded SmolLM2-135M: perplexity after init, plain and self-guided healing.

Usage: .venv/bin/python bench/structured.py [--kinds lowrank blockdense blockshuffle]
                                            [--fractions 0.63 0.32] [--modes init plain self_guided]
                                            [--steps 16] [--max-windows 16]
       .venv/bin/python bench/structured.py --timing [--repeats 50] [--threads N]

Every row is the shipped ``lowrank-63.yaml`` with the row's parameterisation and FFN fraction: the
MLP linears of blocks 1-29 are fitted on 32 calibration sequences of 512 tokens (activation-aware),
once; ``init`` evaluates the fit, ``plain`` and ``self_guided`` each heal a copy of the same fit for
the same number of steps (``--steps``, batch 2 x 512 tokens, lr 1e-4, structured factors only; the
guide decays over the first half of the steps). Each row runs in its own process. Printed per row:
perplexity on the Shakespeare evaluation split, the FFN's share of its dense parameters (block 0
included), the mean relative output error after the fit and the wall times of fit and healing.

``--timing`` prints the CPU time of one MLP block of this model's shape (576 -> 1536 gate/up,
1536 -> 576 down, SiLU-gated) at 1 and 512 tokens for dense and every parameterisation at each
fraction, unmerged and pre-merged, with torch's default thread count: the best of 5 trials of
``--repeats`` calls each. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

console = Console(width=170)
RECIPE = Path(__file__).resolve().parent.parent / "tersa" / "recipes" / "lowrank-63.yaml"
KINDS = ["lowrank", "blockdense", "blockshuffle"]
MODES = ["init", "plain", "self_guided"]
HIDDEN, INTER = 576, 1536
TRIALS = 5


def cell_recipe(kind: str, fraction: float, max_windows: int) -> dict:
    """The shipped LowRank recipe turned into one row of the table (the fit, no healing)."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["calibration"]["samples"] = 32  # 16k tokens: the stage's max_tokens for the moments
    recipe["evaluation"].update(max_windows=max_windows, baseline=False)
    stage = recipe["stages"][0]["structured_ffn"]
    stage.update(kind=kind, fraction=fraction, healing=None)
    if kind == "blockshuffle":
        del stage["rank_multiple"]  # block counts come from the fraction alone
    return recipe


def run_row(kind: str, fraction: float, modes: list[str], steps: int, max_windows: int) -> dict:
    """Fit once, evaluate, then heal a copy per healing mode from the same fit and evaluate it."""
    import copy

    import torch

    from tersa.eval.ppl import perplexity
    from tersa.loading import open_model
    from tersa.pipeline import _Run
    from tersa.progress import Reporter
    from tersa.recipe import parse_recipe
    from tersa.structured.config import HealingConfig
    from tersa.structured.healing import heal
    from tersa.structured.stage import as_guide

    recipe = parse_recipe(cell_recipe(kind, fraction, max_windows))
    run = _Run.start(recipe, Reporter(quiet=True))
    fit = run.apply_stages()[0]  # the stage's record: wall time and metrics
    sm = fit["metrics"]
    out = {
        "ffn_fraction": sm["ffn_fraction"],
        "mean_init_error": sm["mean_init_error"],
        "fit_wall_s": fit["wall_s"],
    }

    def ppl(model) -> float:
        with torch.no_grad():
            return round(perplexity(model, run.eval_ids, batch_size=8).ppl, 4)

    dense, _, _ = open_model(recipe.model)
    for mode in modes:
        if mode == "init":
            out["init"] = {"ppl": ppl(run.model)}
            continue
        model = copy.deepcopy(run.model)
        guides = {}
        if mode == "self_guided":
            guides = {name: as_guide(dense.get_submodule(name)) for name in sm["layers"]}
        cfg = HealingConfig(mode=mode, steps=steps, lr=1e-4, guided_fraction=0.5, batch_size=2)
        run.ctx.stage_name = "structured_ffn"
        record = heal(model, cfg, run.ctx, guides)
        out[mode] = {
            "ppl": ppl(model),
            "heal_wall_s": record["wall_s"],
            "loss": [record["loss_before"], record["loss_after"]],
        }
        del model
    return out


def timing(repeats: int) -> None:
    """CPU time of one MLP block, dense against every parameterisation (see the module doc)."""
    import torch
    from torch import nn

    from tersa.structured.build import make_layer, spec_for

    torch.manual_seed(0)

    def mlp(make) -> tuple[nn.Module, ...]:
        return make(HIDDEN, INTER), make(HIDDEN, INTER), make(INTER, HIDDEN)

    def run(layers, x):
        gate, up, down = layers
        return down(nn.functional.silu(gate(x)) * up(x))

    def clock(layers, tokens: int) -> float:
        x = torch.randn(1, tokens, HIDDEN)
        best = float("inf")
        with torch.no_grad():
            for _ in range(5):
                run(layers, x)
            for _ in range(TRIALS):  # the best trial: other load on the machine only adds time
                t = time.perf_counter()
                for _ in range(repeats):
                    run(layers, x)
                best = min(best, (time.perf_counter() - t) / repeats * 1e3)
        return best

    def structured(kind: str, fraction: float, merge_below: int):
        def make(n: int, m: int):
            spec = spec_for(n, m, kind, fraction, rank_multiple=8 if kind != "blockshuffle" else 1)
            return make_layer(spec, False, merge_below, torch.device("cpu"), torch.float32).eval()

        return make

    dense = mlp(lambda n, m: nn.Linear(n, m, bias=False))
    d1, d512 = clock(dense, 1), clock(dense, 512)
    table = Table(
        title=f"MLP block {HIDDEN}->{INTER}->{HIDDEN}, fp32, {torch.get_num_threads()} threads, ms per call"
    )
    for col in ("layer", "params", "1 token", "512 tokens", "1 token pre-merged"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    dense_params = 3 * HIDDEN * INTER
    table.add_row("dense", f"{dense_params / 1e6:.2f}M", f"{d1:.3f}", f"{d512:.2f}", "-")
    for kind in KINDS:
        for fraction in (0.63, 0.32):
            layers = mlp(structured(kind, fraction, 0))
            merged = mlp(structured(kind, fraction, 2))  # 1 token < 2: the merged dense product
            params = sum(layer.weight_parameters() for layer in layers)
            t1, t512, m1 = clock(layers, 1), clock(layers, 512), clock(merged, 1)
            table.add_row(
                f"{kind} {fraction}",
                f"{params / 1e6:.2f}M ({params / dense_params:.3f})",
                f"{t1:.3f} ({t1 / d1:.2f}x)",
                f"{t512:.2f} ({t512 / d512:.2f}x)",
                f"{m1:.3f} ({m1 / d1:.2f}x)",
            )
    console.print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="*", choices=KINDS, default=KINDS)
    p.add_argument("--fractions", nargs="*", type=float, default=[0.63, 0.32])
    p.add_argument("--modes", nargs="*", choices=MODES, default=MODES)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--timing", action="store_true")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch threads for --timing")
    p.add_argument("--row", nargs=2, metavar=("KIND", "FRACTION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.timing:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        timing(args.repeats)
        return
    if args.row:
        kind, fraction = args.row
        row = run_row(kind, float(fraction), args.modes, args.steps, args.max_windows)
        print("ROW " + json.dumps(row), flush=True)
        return

    table = Table(
        title=f"SmolLM2-135M structured FFN (blocks 1-29), healing {args.steps} steps x 2 x 512 tokens"
    )
    for col in ("layer", "FFN params", "init error", *args.modes):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for kind in args.kinds:
        for fraction in args.fractions:
            cmd = [sys.executable, __file__, "--row", kind, str(fraction), "--modes", *args.modes]
            cmd += ["--steps", str(args.steps), "--max-windows", str(args.max_windows)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("ROW ")), None)
            if line is None:
                console.print(f"{kind} {fraction} failed:\n{done.stderr[-3000:]}", markup=False)
                continue
            r = json.loads(line[4:])
            console.print(f"{kind} {fraction}: {json.dumps(r)}", highlight=False, markup=False)
            cells = [
                f"{r[m]['ppl']:.2f}" + (f" ({r[m]['heal_wall_s']:.0f} s)" if m != "init" else "")
                for m in args.modes
            ]
            table.add_row(
                f"{kind} {fraction}",
                f"{r['ffn_fraction']:.3f}",
                f"{r['mean_init_error']:.4f} ({r['fit_wall_s']:.0f} s)",
                *cells,
            )
    table.caption = (
        "cell: perplexity on the evaluation split (wall time of the fit / the healing, 2 CPU cores); "
        "FFN params: the MLPs' share of their dense parameters, block 0 (dense) included"
    )
    console.print(table)


if __name__ == "__main__":
    main()
