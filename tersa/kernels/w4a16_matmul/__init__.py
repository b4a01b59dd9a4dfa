"""W4A16 matmul: float activations times packed 4-bit weights, dequantized inside the GEMM."""

from __future__ import annotations

import torch

from tersa.kernels.dispatch import use_triton
from tersa.kernels.w4a16_matmul.reference import w4a16_matmul_reference

__all__ = ["w4a16_matmul", "w4a16_matmul_reference"]


def w4a16_matmul(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x · Ŵᵀ + bias`` with ``Ŵ = (q - z) · s`` dequantized group by group.

    :param x: activations ``[..., K]`` (usually ``[M, K]``, M from 1 to thousands), float.
    :param weight_packed: int32 ``[N, ceil(K / 8)]``: signed 4-bit codes offset by 8, eight per
        word, the first in the lowest bits (:func:`~tersa.quant.primitives.pack_int32`).
    :param scale: ``[N, G]`` with ``G = ceil(K / group_size)`` (the last group may be shorter), or
        ``[N, 1]`` when ``group_size`` is None (one scale per output channel).
    :param zero_point: int8 codes of ``scale``'s shape (asymmetric), or None (symmetric).
    :param group_size: inputs per group, or None for per-channel scales.
    :param bias: ``[N]`` or None.
    :returns: ``[..., N]`` in ``x``'s dtype. CUDA tensors run the Triton kernel (fp32 accumulation);
        others run :func:`w4a16_matmul_reference` (float32 math).

    Example::

        qw = quantize_weight(w, WeightScheme(bits=4, granularity="group", group_size=128))
        y = w4a16_matmul(x, pack_int32(qw.codes, 4), qw.scale, qw.zero_point, 128)
    """
    if use_triton(x, weight_packed, scale, zero_point, bias):
        from tersa.kernels.w4a16_matmul.triton import w4a16_matmul_triton

        return w4a16_matmul_triton(x, weight_packed, scale, zero_point, group_size, bias)
    return w4a16_matmul_reference(x, weight_packed, scale, zero_point, group_size, bias)
