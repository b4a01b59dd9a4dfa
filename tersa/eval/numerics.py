"""Numeric error metrics shared by tests and reports.

``sqnr_db`` grades quantization quality (a floor per format); ``err_ratio`` compares a kernel with
its reference (a relative RMS error with an absolute floor, robust in bf16 where atol/rtol are not).
Both compute in float64 so the metric itself adds no error.
"""

from __future__ import annotations

import math

import torch


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(||ref||² / ||ref − x||²)`` in dB.

    ``ref`` and ``x`` have the same shape. Returns ``inf`` when they are equal.
    """
    ref64, x64 = ref.detach().to(torch.float64), x.detach().to(torch.float64)
    noise = float((ref64 - x64).pow(2).sum())
    signal = float(ref64.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def err_ratio(ref: torch.Tensor, out: torch.Tensor, floor: float = 1e-6) -> float:
    """``rms(ref − out) / max(rms(ref), floor)``; the floor keeps an all-zero reference usable."""
    ref64, out64 = ref.detach().to(torch.float64), out.detach().to(torch.float64)
    err = float((ref64 - out64).pow(2).mean().sqrt())
    scale = float(ref64.pow(2).mean().sqrt())
    return err / max(scale, floor)
