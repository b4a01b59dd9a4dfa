"""W8A8 matmul: per-token int8 activations times per-channel int8 weights, int32 accumulation."""

from __future__ import annotations

import torch

from tersa.kernels.dispatch import use_triton
from tersa.kernels.w8a8_matmul.reference import w8a8_matmul_reference

__all__ = ["w8a8_matmul", "w8a8_matmul_reference"]


def w8a8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = (q_x · s_x) (q_w · s_w)ᵀ + bias`` with ``x`` quantized per token on the fly.

    :param x: activations ``[..., K]`` (usually ``[M, K]``), float. Each row gets the symmetric
        int8 scale ``max|x| / 127`` (float32), as
        :func:`~tersa.quant.primitives.fake_quantize_per_token` computes it.
    :param weight: symmetric int8 weight codes ``[N, K]`` (unpacked).
    :param w_scale: per-output-channel scales ``[N]`` or ``[N, 1]``.
    :param bias: ``[N]`` or None.
    :returns: ``[..., N]`` in ``x``'s dtype: the exact int32 product of the codes times both scales
        plus bias, in float32. CUDA tensors run the Triton kernels, others
        :func:`w8a8_matmul_reference`.

    Example::

        qw = quantize_weight(w, WeightScheme(bits=8, granularity="channel"))
        y = w8a8_matmul(x, qw.codes, qw.scale, bias)
    """
    if use_triton(x, weight, w_scale, bias):
        from tersa.kernels.w8a8_matmul.triton import w8a8_matmul_triton

        return w8a8_matmul_triton(x, weight, w_scale, bias)
    return w8a8_matmul_reference(x, weight, w_scale, bias)
