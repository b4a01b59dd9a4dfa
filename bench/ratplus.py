"""RAT+ against its attention twin: sparse KV patterns, equal-memory StreamingLLM, long-range recall.

Usage: .venv/bin/python bench/ratplus.py [--ratplus trained:ratplus-shakespeare]
                                         [--attention trained:attention-shakespeare]
                                         [--windows 24] [--probes 32] [--gaps 512 768]
                                         [--contexts 1024 4096] [--decode-tokens 32] [--json PATH]
       .venv/bin/python bench/ratplus.py --smoke     # tiny untrained twins: checks the code paths

The models come from ``make models`` (``tersa/recipes/{ratplus,attention}-shakespeare.yaml``). Rows:

- RAT+ dense and the twin dense;
- RAT+ at D = 4, 16, 64 (window W = 4), a wider window (D=16, W=16), sinks (D=16, W=4, P=4), and
  one hybrid (layer 0 dense, the others D=64, W=4);
- for each sparse RAT+ row, the twin under StreamingLLM (4 sinks + a window, no dilation) with as
  many cache entries per layer as the RAT+ row holds at the window length, its recurrent state
  counted as one more entry (an fp32 ``cat(k̃, ṽ)`` is one fp32 key/value entry).

Columns:

1. **Perplexity** on ``--windows`` windows of ``--seq-len`` tokens spread over the Shakespeare
   evaluation split (unseen tragedies), and the paired per-token NLL difference against the same
   model dense, ``mean(nll_row − nll_dense)``, with its standard error over windows (per-window
   means; tokens inside a window are correlated). KV bytes per token: the compact cache's
   ``kv_bytes()`` after prefilling one window, divided by its length.
2. **Recall probe** (:mod:`tersa.kv.probe`): ``--probes`` passages of 64 evaluation tokens repeated
   after a gap of ``--gaps`` tokens; the NLL on the repeat, its paired difference against dense
   (standard error over probes), the NLL of the same tokens at their first occurrence (no help from
   context), and the share of exact greedy continuations (16 tokens after 8 cue tokens).
3. **Decode speed** on the CPU: tokens/s of greedy decoding of ``--decode-tokens`` tokens after a
   context of each ``--contexts`` length (evaluation text, prefilled once), batch 1, with the
   threads torch picks; and the cache bytes at that context.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table

from tersa.data.sources import load_text
from tersa.data.tokens import eval_windows, tokenize_text
from tersa.kv import KVPattern, RatPlusConfig, RatPlusForCausalLM, cache_entries
from tersa.kv.probe import build_recall_probe, recall_scores, token_nll

console = Console(width=170)
SINKS = 4  # StreamingLLM's attention sinks
RATPLUS_ROWS: list[tuple[str, Any]] = [
    ("D=4 W=4", {"dilation": 4, "window": 4}),
    ("D=16 W=4", {"dilation": 16, "window": 4}),
    ("D=64 W=4", {"dilation": 64, "window": 4}),
    ("D=16 W=16", {"dilation": 16, "window": 16}),
    ("D=16 W=4 P=4", {"dilation": 16, "window": 4, "sinks": 4}),
    ("hybrid: L0 dense, D=64 W=4", "hybrid"),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratplus", default="trained:ratplus-shakespeare")
    p.add_argument("--attention", default="trained:attention-shakespeare")
    p.add_argument("--seq-len", type=int, default=1024, help="evaluation window length")
    p.add_argument("--windows", type=int, default=24, help="evaluation windows")
    p.add_argument("--probes", type=int, default=32, help="recall probes per gap")
    p.add_argument("--gaps", type=int, nargs="+", default=[512, 768])
    p.add_argument("--passage", type=int, default=64)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--smoke", action="store_true", help="tiny untrained twins, tiny sizes")
    args = p.parse_args()
    if args.smoke:
        args.seq_len, args.windows, args.probes, args.gaps = 128, 3, 3, [48]
        args.passage, args.contexts, args.decode_tokens = 32, [128, 256], 4
    return args


# ------------------------------------------------------------------------------------ models


def load_twins(args: argparse.Namespace) -> tuple[RatPlusForCausalLM, RatPlusForCausalLM, Any]:
    """(RAT+, attention twin, tokenizer); with ``--smoke`` tiny random ones."""
    if args.smoke:
        return smoke_twins()
    from tersa.kv.train import load_trained

    ratplus, tokenizer, _ = load_trained(args.ratplus)
    twin, twin_tok, _ = load_trained(args.attention)
    if twin_tok.get_vocab() != tokenizer.get_vocab():
        raise SystemExit("the twins have different tokenizers; train them from the twin recipes")
    return ratplus, twin, tokenizer


def smoke_twins() -> tuple[RatPlusForCausalLM, RatPlusForCausalLM, Any]:
    from tersa.kv.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(load_text("embedded:shakespeare", "calibration"), vocab_size=320)
    models = []
    for kind in ("ratplus", "attention"):
        torch.manual_seed(0)
        config = RatPlusConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            attention=kind,
            scan_chunk=8,
        )
        models.append(RatPlusForCausalLM(config).eval())
    return models[0], models[1], tokenizer


def hybrid(layers: int) -> list[dict[str, Any]]:
    return [KVPattern().to_dict()] + [{"dilation": 64, "window": 4, "sinks": 0}] * (layers - 1)


def streaming_match(pattern: Any, layers: int, tokens: int) -> list[dict[str, Any]]:
    """Per layer, the StreamingLLM pattern (``SINKS`` sinks + a window) holding as many entries
    after ``tokens`` tokens as the RAT+ pattern's cache plus its recurrent state."""
    out = []
    for p in _per_layer(pattern, layers):
        if p.dense:
            out.append(p.to_dict())
            continue
        entries = cache_entries(tokens, p) + 1  # + the recurrent state
        out.append({"dilation": None, "window": max(entries - SINKS - 1, 0), "sinks": SINKS})
    return out


def describe(stream: list[dict[str, Any]]) -> str:
    """``StreamingLLM P=4 W=64``, with ``L0 dense, `` in front when layer 0 stays dense."""
    sparse = [p for p in stream if p["dilation"] is None]
    text = f"StreamingLLM P={sparse[0]['sinks']} W={max(p['window'] for p in sparse)}"
    return ("L0 dense, " if stream[0]["dilation"] == 1 else "") + text


def _per_layer(pattern: Any, layers: int) -> list[KVPattern]:
    if isinstance(pattern, list):
        return [KVPattern.from_value(p) for p in pattern]
    return [KVPattern.from_value(pattern)] * layers


def rows(ratplus: RatPlusForCausalLM, twin: RatPlusForCausalLM, seq_len: int) -> list[dict]:
    """Every (label, model, pattern, baseline) of the tables."""
    layers = ratplus.config.num_hidden_layers
    out = [
        {"label": "attention (twin), dense", "model": twin, "pattern": None, "base": "twin"},
        {"label": "RAT+ dense", "model": ratplus, "pattern": None, "base": "ratplus"},
    ]
    for label, pattern in RATPLUS_ROWS:
        pattern = hybrid(layers) if pattern == "hybrid" else pattern
        out.append(
            {"label": f"RAT+ {label}", "model": ratplus, "pattern": pattern, "base": "ratplus"}
        )
        stream = streaming_match(pattern, layers, seq_len)
        out.append({"label": "  twin " + describe(stream), "model": twin, "pattern": stream,
                    "base": "twin"})  # fmt: skip
    return out


# ------------------------------------------------------------------------------- measurements


def paired(diff: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of per-unit differences ``diff [N]``."""
    n = diff.numel()
    se = diff.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return diff.mean().item(), se


def kv_bytes_per_token(model: RatPlusForCausalLM, ids: torch.Tensor) -> float:
    """``kv_bytes()`` of the compact cache after prefilling ``ids [1, T]``, per token."""
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    return cache.kv_bytes() / ids.shape[1]


def decode_speed(model: RatPlusForCausalLM, context: torch.Tensor, steps: int) -> dict[str, float]:
    """Greedy decode ``steps`` tokens after prefilling ``context [1, C]``: tokens/s and cache bytes."""
    with torch.no_grad():
        out = model(input_ids=context, use_cache=True)
        out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
        nxt, cache = out.logits[:, -1:].argmax(-1), out.cache  # one untimed step: warm-up
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            nxt, cache = out.logits[:, -1:].argmax(-1), out.cache
        wall = time.perf_counter() - start
    return {"tokens_per_s": steps / wall, "kv_bytes": cache.kv_bytes()}


def measure(row: dict, windows: torch.Tensor, probes: dict, args: argparse.Namespace) -> dict:
    model = row["model"]
    model.set_kv_pattern(row["pattern"])
    result: dict[str, Any] = {k: row[k] for k in ("label", "pattern", "base")}
    t0 = time.perf_counter()
    result["nll_tokens"] = token_nll(model, windows)  # [N, L − 1]
    result["kv_bytes_per_token"] = kv_bytes_per_token(model, windows[:1])
    result["probe"] = {gap: recall_scores(model, probe) for gap, probe in probes.items()}
    result["decode"] = {
        c: decode_speed(model, ctx, args.decode_tokens) for c, ctx in args.ctx.items()
    }
    result["wall_s"] = time.perf_counter() - t0
    model.set_kv_pattern(None)
    return result


# ------------------------------------------------------------------------------------ tables


def ppl_table(results: list[dict], dense: dict[str, dict]) -> Table:
    t = Table(
        title="Shakespeare evaluation split: perplexity and KV memory",
        caption="ΔNLL: paired against the same model dense, SE over windows. Each twin "
        "StreamingLLM row holds the KV bytes of the RAT+ row above it at the window length.",
    )
    for col in ("row", "KV bytes/token", "ppl", "ΔNLL (nats)", "± SE"):
        t.add_column(col, justify="left" if col == "row" else "right")
    for r in results:
        nll = r["nll_tokens"]
        diff = (nll - dense[r["base"]]["nll_tokens"]).mean(-1)  # per-window mean difference
        mean, se = paired(diff)
        ppl = math.exp(nll.mean().item())
        kv = r["kv_bytes_per_token"]
        t.add_row(r["label"], f"{kv:,.0f}", f"{ppl:.3f}", f"{mean:+.4f}", f"{se:.4f}")
    return t


def probe_table(results: list[dict], dense: dict[str, dict], gaps: list[int]) -> Table:
    t = Table(
        title="Recall probe: a passage repeated after a gap G",
        caption="NLL rep: mean NLL (nats) of the repeat; Δ: paired against the same model dense, "
        "SE over probes; NLL 1st: the same tokens at their first occurrence; exact: greedy "
        "continuation of 16 tokens after 8 cue tokens.",
    )
    t.add_column("row")
    for gap in gaps:
        for col in ("NLL rep", "Δ ± SE", "NLL 1st", "exact"):
            t.add_column(f"G={gap} {col}", justify="right")
    for r in results:
        cells = [r["label"]]
        for gap in gaps:
            s, base = r["probe"][gap], dense[r["base"]]["probe"][gap]
            mean, se = paired(s["nll_repeat"] - base["nll_repeat"])
            rep, first = s["nll_repeat"].mean().item(), s["nll_first"].mean().item()
            exact = s["exact"].float().mean().item()
            cells += [f"{rep:.3f}", f"{mean:+.3f} ± {se:.3f}", f"{first:.3f}", f"{exact:.0%}"]
        t.add_row(*cells)
    return t


def decode_table(results: list[dict], contexts: list[int]) -> Table:
    t = Table(title=f"CPU greedy decoding, batch 1, {torch.get_num_threads()} threads")
    t.add_column("row")
    for c in contexts:
        t.add_column(f"ctx {c} tokens/s", justify="right")
        t.add_column(f"ctx {c} KV MiB", justify="right")
    for r in results:
        cells = [r["label"]]
        for c in contexts:
            d = r["decode"][c]
            cells += [f"{d['tokens_per_s']:.1f}", f"{d['kv_bytes'] / 2**20:.2f}"]
        t.add_row(*cells)
    return t


def to_json(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        probe = {str(g): {k: v.tolist() for k, v in s.items()} for g, s in r["probe"].items()}
        entry = {k: r[k] for k in ("label", "pattern", "wall_s", "kv_bytes_per_token")}
        entry["nll_window_means"] = r["nll_tokens"].mean(-1).tolist()
        entry["probe"] = probe
        entry["decode"] = {str(c): d for c, d in r["decode"].items()}
        out.append(entry)
    return out


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    ratplus, twin, tokenizer = load_twins(args)
    ids = tokenize_text(tokenizer, load_text("embedded:shakespeare", "evaluation"))
    windows = eval_windows(ids, args.seq_len, args.windows, spread=True)
    probes = {g: build_recall_probe(ids, args.probes, args.passage, g, seed=g) for g in args.gaps}
    args.ctx = {c: ids[:c].unsqueeze(0) for c in args.contexts}
    results, dense = [], {}
    for row in rows(ratplus, twin, args.seq_len):
        console.print(f"[dim]measuring {row['label'].strip()} ...[/dim]")
        results.append(measure(row, windows, probes, args))
        if row["pattern"] is None:
            dense[row["base"]] = results[-1]
    console.print(ppl_table(results, dense))
    console.print(probe_table(results, dense, args.gaps))
    console.print(decode_table(results, args.contexts))
    if args.json:
        args.json.write_text(json.dumps(to_json(results), indent=1) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
