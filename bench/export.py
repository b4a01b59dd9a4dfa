"""Exports of the embedded SmolLM2-135M: size on disk, load time, perplexity round trip, decode speed.

Usage: .venv/bin/python bench/export.py [--rows fp32 bf16 w8a8 w4a16-g128 w4a16-g64]
                                        [--max-windows 8]
                                        [--decode-tokens 64]

Each row runs a recipe with an output folder (a real export), reloads the folder twice — with
tersa's loader and with plain ``transformers.AutoModelForCausalLM.from_pretrained`` (after
``import tersa``, which registers tersa's quantizer for exports compressed-tensors cannot express)
— and prints: the folder's tensor bytes and bits per parameter, both load times, perplexity before
export and after each reload on the same evaluation windows (they must be equal), and CPU decode
speed: tokens per second of greedy single-sequence decoding with a KV cache after a 32-token
prompt (prefill excluded).

bf16 is evaluated on one 128-token window (``--bf16-windows``, ``--bf16-seq-len``): this CPU has no
bf16 matrix units, and a bf16 forward of a 512-token window takes minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from tersa.data.sources import load_text
from tersa.data.tokens import eval_windows, tokenize_text
from tersa.eval.ppl import perplexity
from tersa.export.load import load_export
from tersa.pipeline import run_recipe
from tersa.recipe import parse_recipe

console = Console(width=170)
W8 = {"bits": 8, "granularity": "channel", "symmetric": True}
W4G128 = {"bits": 4, "granularity": "group", "group_size": 128, "symmetric": False}
ROWS: dict[str, tuple[str, list]] = {
    "fp32": ("float32", []),
    "bf16": ("bfloat16", []),
    "w8a8": ("float32", [{"quantize": {"weights": W8, "activations": {"bits": 8}}}]),
    "w4a16-g128": ("float32", [{"quantize": {"weights": W4G128}}]),
    # 576 inputs do not divide into groups of 128, which compressed-tensors requires; g64 does.
    "w4a16-g64": ("float32", [{"quantize": {"weights": {**W4G128, "group_size": 64}}}]),
}
PROMPT_TOKENS = 32
CT = "compressed-tensors"


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files (safetensors) in ``folder``."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@torch.no_grad()
def decode_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding of ``new_tokens`` after ``prompt [1, P]`` with the model's KV cache;
    tokens per second of the decode steps only."""
    model.eval()
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - t0)


def quant_method(folder: Path) -> str:
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    return qc.get("quant_method", "none")


def plain_transformers_load(folder: Path) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained``; tersa is imported above, which registers its
    quantizer (compressed-tensors exports do not need it)."""
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    groups = qc.get("config_groups", {}).values() if qc.get("quant_method") == CT else []
    asym = any(g.get("weights") and not g["weights"]["symmetric"] for g in groups)
    # compressed-tensors 0.20.1's default path expects an unpacked asymmetric zero point
    # (vllm-project/llm-compressor#1618); decompressing at load works.
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--bf16-windows", type=int, default=1)
    p.add_argument("--bf16-seq-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)

    table = Table(title="SmolLM2-135M exports (CPU)")
    cols = ("export", "quant_method", "MiB", "bits/param", "load tersa s", "load HF s", "ppl before",
            "ppl tersa", "ppl HF", "windows×len", "decode tok/s")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "export" else "right")
    for name in args.rows:
        dtype, stages = ROWS[name]
        windows = args.bf16_windows if name == "bf16" else args.max_windows
        seq_len = args.bf16_seq_len if name == "bf16" else 512
        recipe = parse_recipe(
            {
                "model": "embedded:smollm2-135m",
                "dtype": dtype,
                "evaluation": {"max_windows": windows, "seq_len": seq_len, "baseline": False},
                "stages": stages,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / name
            result = run_recipe(recipe, out)
            params = result.metrics["baseline"]["params"]
            ppl_before = result.metrics["compressed"]["ppl"]
            del result
            gc.collect()
            tok_text = load_text("embedded:shakespeare", "evaluation")
            tokenizer = AutoTokenizer.from_pretrained(out)
            ids = eval_windows(tokenize_text(tokenizer, tok_text), seq_len, windows, True)
            size, method = folder_bytes(out), quant_method(out)

            t0 = time.perf_counter()
            model = load_export(out)
            load_tersa = time.perf_counter() - t0
            ppl_tersa = perplexity(model, ids).ppl
            prompt = ids[:1, :PROMPT_TOKENS]
            tok_s = decode_tokens_per_s(model, prompt, args.decode_tokens)
            del model
            gc.collect()

            t0 = time.perf_counter()
            hf = plain_transformers_load(out)
            load_hf = time.perf_counter() - t0
            ppl_hf = perplexity(hf, ids).ppl
            del hf
            gc.collect()
        table.add_row(
            name,
            method,
            f"{size / 2**20:.1f}",
            f"{8 * size / params:.2f}",
            f"{load_tersa:.2f}",
            f"{load_hf:.2f}",
            f"{ppl_before:.4f}",
            f"{ppl_tersa:.4f}",
            f"{ppl_hf:.4f}",
            f"{windows}×{seq_len}",
            f"{tok_s:.1f}",
        )
        console.print(f"{name}: done", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
