"""Kernel benchmarks: W4A16 and W8A8 matmul against dense matmuls; Quest against dense decode.

Usage: .venv/bin/python bench/kernels.py [--hbm-gbps 4800] [--cpu]

On CPU: the torch references (the CPU path of both ops) against a float32 matmul, M = 1 to 2048.
On CUDA: the autotuned Triton kernels, timed with ``triton.testing.do_bench`` (median, L2 flushed
between runs), bf16 activations:

- decode (M = 1): GB/s and percent of the HBM roofline. Target: W4A16 >= 80 %.
- prefill: TFLOP/s and the ratio to bf16 cuBLAS (``F.linear``). Target: W8A8 >= 1.6x at M >= 2048.

The W4A16 weight is group 128, asymmetric (scale bf16, int8 zero point); W8A8 is per-channel.

Quest decode (16-token pages, a fixed token budget, GQA 32/8 heads, d = 128) against dense decode
attention over the whole cache (``ratplus_decode``: the same attention without selection). The
page bounds are precomputed, as a cache keeps them. On CPU the references; on CUDA the Triton
kernels in bf16, with GB/s of the bytes each kernel reads (the dense kernel: K and V of every KV
head once; Quest: the page bounds, then K and V of the selected pages per query head).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from tersa.kernels.quest_decode import (
    quest_decode,
    quest_page_bounds,
    quest_page_scores,
    quest_select,
)
from tersa.kernels.ratplus_decode import ratplus_decode
from tersa.kernels.w4a16_matmul import w4a16_matmul
from tersa.kernels.w8a8_matmul import w8a8_matmul
from tersa.quant.primitives import num_groups, packed_width

GROUP = 128
# Peak HBM bandwidth, GB/s, by device name (first match wins); --hbm-gbps overrides.
HBM_GBPS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0)]
W4A16_DECODE_TARGET = 0.80  # of the memory roofline
W8A8_PREFILL_TARGET = 1.6  # x bf16 cuBLAS
CPU_MS = (1, 16, 256, 2048)
CPU_SHAPE = (2048, 2048)  # (K, N)
GPU_DECODE_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
GPU_PREFILL_SHAPES = [(4096, 4096), (4096, 14336), (8192, 8192)]
GPU_PREFILL_MS = (16, 256, 2048, 4096)
QUEST_HEADS = (32, 8, 128)  # (Hq, Hkv, d): a Llama-3-8B layer
QUEST_PAGE = 16  # tokens per page, the paper's
QUEST_BUDGET = 1024  # tokens read per query head (64 pages); the paper sweeps 256 to 4096
CPU_QUEST = [(1, 2048), (1, 8192)]  # (B, length)
GPU_QUEST = [(1, 32768), (8, 32768), (32, 8192)]


def make_weights(k: int, n: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random codes, scales and zero points of both formats for an ``[n, k]`` weight."""
    g = num_groups(k, GROUP)
    return {
        "packed": torch.randint(-(2**31), 2**31 - 1, (n, packed_width(k, 4)), device=device).int(),
        "scale4": (torch.rand(n, g, device=device) * 0.02 + 0.001).to(dtype),
        "zp4": torch.randint(-8, 8, (n, g), device=device, dtype=torch.int8),
        "codes8": torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8),
        "scale8": (torch.rand(n, device=device) * 0.02 + 0.001).to(dtype),
        "dense": (torch.randn(n, k, device=device) * 0.02).to(dtype),
    }


def ops(w: dict[str, torch.Tensor]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The three matmuls of one shape, as functions of the activations."""
    return {
        "dense": lambda x: F.linear(x, w["dense"]),
        "w4a16": lambda x: w4a16_matmul(x, w["packed"], w["scale4"], w["zp4"], GROUP),
        "w8a8": lambda x: w8a8_matmul(x, w["codes8"], w["scale8"]),
    }


# ----------------------------------------------------------------------------------------- CPU


def cpu_ms(fn: Callable[[], object], budget_s: float = 0.4, max_reps: int = 20) -> float:
    """Median wall time in ms: one warm-up call, then repeats until ``budget_s`` is spent."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_cpu() -> Table:
    k, n = CPU_SHAPE
    f = ops(make_weights(k, n, "cpu", torch.float32))
    table = Table(title=f"CPU references (torch, {torch.get_num_threads()} threads), K=N={k}, fp32")
    for col in ("M", "fp32 matmul ms", "W4A16 ref ms", "x fp32", "W8A8 ref ms", "x fp32"):
        table.add_column(col, justify="right")
    for m in CPU_MS:
        x = torch.randn(m, k)
        t = {name: cpu_ms(partial(fn, x)) for name, fn in f.items()}
        table.add_row(
            str(m),
            f"{t['dense']:.2f}",
            f"{t['w4a16']:.2f}",
            f"{t['w4a16'] / t['dense']:.1f}",
            f"{t['w8a8']:.2f}",
            f"{t['w8a8'] / t['dense']:.1f}",
        )
    return table


def quest_ops(
    b: int, length: int, device: str, dtype: torch.dtype
) -> dict[str, Callable[[], object]]:
    """Dense decode attention and the three per-step Quest stages on one random cache."""
    hq, hkv, d = QUEST_HEADS
    q = torch.randn(b, hq, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, hkv, length, d, device=device, dtype=dtype) for _ in range(2))
    kmin, kmax = quest_page_bounds(k, length, QUEST_PAGE)
    scores = quest_page_scores(q, kmin, kmax)
    n_pages = QUEST_BUDGET // QUEST_PAGE
    pages = quest_select(scores, n_pages)
    return {
        "dense": partial(ratplus_decode, q, k, v, length),
        "scores": partial(quest_page_scores, q, kmin, kmax),
        "select": partial(quest_select, scores, n_pages),
        "decode": partial(quest_decode, q, k, v, pages, length, QUEST_PAGE),
    }


def bench_quest_cpu() -> Table:
    hq, hkv, d = QUEST_HEADS
    title = f"Quest decode, CPU references, fp32: Hq={hq} Hkv={hkv} d={d}, page {QUEST_PAGE}"
    table = Table(title=f"{title}, budget {QUEST_BUDGET} tokens")
    for col in ("B", "length", "dense ms", "scores ms", "select ms", "decode ms", "Quest ms"):
        table.add_column(col, justify="right")
    table.add_column("x dense", justify="right")
    for b, length in CPU_QUEST:
        t = {name: cpu_ms(fn) for name, fn in quest_ops(b, length, "cpu", torch.float32).items()}
        quest = t["scores"] + t["select"] + t["decode"]
        cells = [f"{t[name]:.2f}" for name in ("dense", "scores", "select", "decode")]
        table.add_row(str(b), str(length), *cells, f"{quest:.2f}", f"{quest / t['dense']:.2f}")
    return table


# ---------------------------------------------------------------------------------------- CUDA


def hbm_peak(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((gbps for key, gbps in HBM_GBPS if key in name), None)


def gpu_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    fn()  # autotune (and compile) outside the timing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def tile(kernel: object) -> str:
    """The autotuner's last pick, e.g. ``16x64x128 k/4 w4s4`` (BLOCK_M x N x K, split-K)."""
    cfg = getattr(kernel, "best_config", None)
    if cfg is None:
        return "?"
    kw = cfg.kwargs
    split = f" k/{kw['SPLIT_K']}" if kw.get("SPLIT_K", 1) > 1 else ""
    return (
        f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}{split} w{cfg.num_warps}s{cfg.num_stages}"
    )


def mark(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


def bench_decode(peak: float | None) -> Table:
    from tersa.kernels.w4a16_matmul.triton import DECODE_KERNEL

    table = Table(title="Decode, M=1, bf16: weight streaming against the HBM roofline")
    cols = ("K x N", "bf16 us", "W4A16 us", "GB/s", "% HBM", f">= {W4A16_DECODE_TARGET:.0%}")
    for col in (*cols, "W4A16 tile", "W8A8 us", "GB/s", "% HBM"):
        table.add_column(col, justify="right")
    for k, n in GPU_DECODE_SHAPES:
        w = make_weights(k, n, "cuda", torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        t = {name: gpu_ms(partial(fn, x)) for name, fn in ops(w).items()}
        io = x.nbytes + n * x.element_size()  # activations in, outputs out
        w4_bytes = w["packed"].nbytes + w["scale4"].nbytes + w["zp4"].nbytes + io
        w8_bytes = w["codes8"].nbytes + w["scale8"].nbytes + io
        gbps4, gbps8 = w4_bytes / t["w4a16"] / 1e6, w8_bytes / t["w8a8"] / 1e6
        pct4 = None if peak is None else gbps4 / peak
        table.add_row(
            f"{k} x {n}",
            f"{t['dense'] * 1e3:.1f}",
            f"{t['w4a16'] * 1e3:.1f}",
            f"{gbps4:.0f}",
            "n/a" if pct4 is None else f"{pct4:.0%}",
            "n/a" if pct4 is None else mark(pct4 >= W4A16_DECODE_TARGET),
            tile(DECODE_KERNEL),
            f"{t['w8a8'] * 1e3:.1f}",
            f"{gbps8:.0f}",
            "n/a" if peak is None else f"{gbps8 / peak:.0%}",
        )
    return table


def bench_prefill() -> Table:
    from tersa.kernels.w4a16_matmul.triton import PREFILL_KERNEL
    from tersa.kernels.w8a8_matmul.triton import TUNED_KERNEL

    table = Table(title="Prefill, bf16: against bf16 cuBLAS (F.linear)")
    cols = ("K x N", "M", "bf16 TFLOP/s", "W4A16 TFLOP/s", "% bf16", "W8A8 TFLOP/s", "x bf16")
    for col in (*cols, f">= {W8A8_PREFILL_TARGET}x", "W4A16 tile", "W8A8 tile"):
        table.add_column(col, justify="right")
    for k, n in GPU_PREFILL_SHAPES:
        f = ops(make_weights(k, n, "cuda", torch.bfloat16))
        for m in GPU_PREFILL_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = {name: gpu_ms(partial(fn, x)) for name, fn in f.items()}
            tflops = {name: 2 * m * n * k / ms / 1e9 for name, ms in t.items()}
            speedup = t["dense"] / t["w8a8"]
            table.add_row(
                f"{k} x {n}",
                str(m),
                f"{tflops['dense']:.0f}",
                f"{tflops['w4a16']:.0f}",
                f"{t['dense'] / t['w4a16']:.0%}",
                f"{tflops['w8a8']:.0f}",
                f"{speedup:.2f}",
                mark(speedup >= W8A8_PREFILL_TARGET) if m >= 2048 else "",
                tile(PREFILL_KERNEL) if m > 16 else "(decode)",
                tile(TUNED_KERNEL),
            )
    return table


def bench_quest(peak: float | None) -> Table:
    hq, hkv, d = QUEST_HEADS
    title = f"Quest decode, bf16, Triton: Hq={hq} Hkv={hkv} d={d}, page {QUEST_PAGE}"
    table = Table(title=f"{title}, budget {QUEST_BUDGET} tokens, against dense decode attention")
    cols = ("B", "length", "dense us", "GB/s", "scores us", "GB/s", "select us", "decode us")
    for col in (*cols, "GB/s", "% HBM", "Quest us", "x dense"):
        table.add_column(col, justify="right")
    n_read = (QUEST_BUDGET // QUEST_PAGE) * QUEST_PAGE  # tokens per query head
    for b, length in GPU_QUEST:
        t = {name: gpu_ms(fn) for name, fn in quest_ops(b, length, "cuda", torch.bfloat16).items()}
        dense_bytes = 2 * b * hkv * length * d * 2  # K and V, bf16
        bound_bytes = 2 * b * hkv * -(-length // QUEST_PAGE) * d * 4  # kmin and kmax, fp32
        decode_bytes = 2 * b * hq * min(n_read, length) * d * 2
        gbps = decode_bytes / t["decode"] / 1e6
        quest = t["scores"] + t["select"] + t["decode"]
        table.add_row(
            str(b),
            str(length),
            f"{t['dense'] * 1e3:.1f}",
            f"{dense_bytes / t['dense'] / 1e6:.0f}",
            f"{t['scores'] * 1e3:.1f}",
            f"{bound_bytes / t['scores'] / 1e6:.0f}",
            f"{t['select'] * 1e3:.1f}",
            f"{t['decode'] * 1e3:.1f}",
            f"{gbps:.0f}",
            "n/a" if peak is None else f"{gbps / peak:.0%}",
            f"{quest * 1e3:.1f}",
            f"{quest / t['dense']:.2f}",
        )
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hbm-gbps", type=float, default=None, help="peak HBM GB/s (default by name)")
    p.add_argument("--cpu", action="store_true", help="CPU reference tables even with a GPU")
    args = p.parse_args()
    console = Console()
    if args.cpu or not torch.cuda.is_available():
        console.print(bench_cpu())
        console.print(bench_quest_cpu())
        return
    name = torch.cuda.get_device_name()
    peak = hbm_peak(name, args.hbm_gbps)
    console.print(
        f"{name}: HBM peak {'unknown (pass --hbm-gbps)' if peak is None else f'{peak:.0f} GB/s'}"
    )
    console.print(bench_decode(peak))
    console.print(bench_prefill())
    console.print(bench_quest(peak))


if __name__ == "__main__":
    main()
