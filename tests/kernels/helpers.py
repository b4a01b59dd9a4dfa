"""Shared pieces of the kernel tests: where launchers run, the GPU marker, tolerances."""

from __future__ import annotations

import os

import pytest
import torch

from tersa.eval.numerics import err_ratio

# tests/conftest.py defaults TRITON_INTERPRET to 1; bench/gpu_check.sh sets 0 to compile kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# With @pytest.mark.gpu on dispatcher tests over CUDA tensors: the compiled, autotuned path.
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs a CUDA device and TRITON_INTERPRET=0 (bench/gpu_check.sh)",
)

# err_ratio (relative RMS) bound and max-abs bound relative to max|ref| of kernel vs reference.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 4e-3)}


def launch_device() -> str:
    """Device for direct launcher calls: CPU under the interpreter, CUDA when compiled."""
    pytest.importorskip("triton")
    if INTERPRET:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 without a CUDA device: the launchers cannot run")
    return "cuda"


def assert_kernel_close(ref: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` matches ``ref`` in shape and dtype, within the ``TOL`` row for ``dtype``."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rms_tol, max_tol = TOL[dtype]
    ratio = err_ratio(ref, out)
    worst = float((ref.double() - out.double()).abs().max()) if ref.numel() else 0.0
    peak = float(ref.double().abs().max()) if ref.numel() else 0.0
    assert ratio < rms_tol, f"relative RMS error {ratio:.3g} >= {rms_tol:g}"
    assert worst <= max_tol * max(peak, 1e-6), f"max error {worst:.3g} > {max_tol:g} * {peak:.3g}"
