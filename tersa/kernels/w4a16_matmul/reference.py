"""W4A16 matmul in pure torch: the spec of the Triton kernel, its test oracle and the CPU path.

The weight is stored as :class:`~tersa.quant.qlinear.QuantLinear` exports it: 4-bit codes packed 8
to an int32 word (:func:`~tersa.quant.primitives.pack_int32`), a scale per group of ``group_size``
inputs (or per output channel) and, for asymmetric schemes, an int8 zero point.
"""

from __future__ import annotations

import sys

import torch

from tersa.quant.primitives import num_groups, packed_width, unpack_int32

BITS = 4


def check_w4a16_args(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int | None,
    bias: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the first argument whose shape or dtype does not fit."""
    if x.dim() < 1 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a float tensor [..., K], got {x.dtype} {tuple(x.shape)}")
    k = x.shape[-1]
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(
            f"weight_packed must be int32 [N, ceil(K/8)], got {weight_packed.dtype} "
            f"{tuple(weight_packed.shape)}"
        )
    n = weight_packed.shape[0]
    if weight_packed.shape[1] != packed_width(k, BITS):
        raise ValueError(
            f"weight_packed has {weight_packed.shape[1]} words per row; K={k} at 4 bits needs "
            f"{packed_width(k, BITS)}"
        )
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be positive or None (per channel), got {group_size}")
    g = 1 if group_size is None else num_groups(k, group_size)
    if tuple(scale.shape) != (n, g) or not scale.dtype.is_floating_point:
        raise ValueError(
            f"scale must be float [N, G] = [{n}, {g}] (group_size={group_size}, K={k}), got "
            f"{scale.dtype} {tuple(scale.shape)}"
        )
    if zero_point is not None and (
        zero_point.shape != scale.shape or zero_point.dtype != torch.int8
    ):
        raise ValueError(
            f"zero_point must be int8 of the scale's shape {tuple(scale.shape)}, got "
            f"{zero_point.dtype} {tuple(zero_point.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got {tuple(bias.shape)}")


def unpack_uint4(weight_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unsigned 4-bit codes ``q + 8`` (uint8 ``[N, in_features]``) of int32 words ``[N, W]``.

    Equal to ``unpack_int32(weight_packed, 4, in_features) + 8``, ~10x faster on CPU: byte views and
    nibble masks instead of int64 shifts (first code in the lowest bits = low nibble of byte 0 on a
    little-endian host).
    """
    if sys.byteorder != "little":
        return (unpack_int32(weight_packed, BITS, in_features).to(torch.int16) + 8).to(torch.uint8)
    b = weight_packed.contiguous().view(torch.uint8)  # [N, 4W], little-endian bytes
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(b.shape[0], -1)[:, :in_features]


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
    offset: int = 0,
) -> torch.Tensor:
    """The float weight ``(c - offset - z) · s`` ``[N, K]`` of integer codes ``c [N, K]``, in ``dtype``.

    ``offset`` is 8 for the unsigned codes of :func:`unpack_uint4`, 0 for signed codes. Values are
    exact integers until the one multiply by the scale (no rounding to the scale's dtype).
    The group parameters ``[N, G]`` broadcast over a ``[N, G, group_size]`` view of one float copy
    of the codes (the short last group apart), updated in place: ~4x faster on CPU than repeating
    them to ``[N, K]`` first (K = N = 1536, group 64: 1.3 ms against 6.8 ms).
    """
    n, k = codes.shape
    w = codes.to(dtype, copy=True)  # [N, K]
    s = scale.to(dtype)  # [N, G]
    zq = torch.full_like(s, offset) if zero_point is None else zero_point.to(dtype) + offset
    gs = group_size or k  # per channel: one group of K
    g_full = k // gs
    head = w[:, : g_full * gs].view(n, g_full, gs)  # [N, G_full, gs], a view of w
    head.sub_(zq[:, :g_full, None]).mul_(s[:, :g_full, None])
    if g_full * gs < k:  # the short last group: [N, K mod gs]
        w[:, g_full * gs :].sub_(zq[:, g_full:]).mul_(s[:, g_full:])
    return w


def w4a16_matmul_codes(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """:func:`w4a16_matmul_reference` on unpacked integer codes ``[N, K]`` (``q + offset``).

    The CPU path of a :class:`~tersa.quant.qlinear.QuantLinear` with its cached int8 codes: the
    unpacking, a third of the reference's time at M = 1, is done once. ``x [..., K]`` ->
    ``[..., N]`` in ``x``'s dtype, computed in float32 (float64 for float64 ``x``).
    """
    k, n = x.shape[-1], codes.shape[0]
    if codes.dim() != 2 or codes.shape[1] != k or codes.dtype.is_floating_point:
        raise ValueError(
            f"codes must be integer [N, K={k}], got {codes.dtype} {tuple(codes.shape)}"
        )
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_codes(codes, scale, zero_point, group_size, dt, offset)  # [N, K]
    out = x.reshape(-1, k).to(dt) @ w.t()  # [M, N]
    if bias is not None:
        out = out + bias.to(dt)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def w4a16_matmul_reference(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequantize(weight).T + bias``: ``x [..., K]`` -> ``[..., N]`` in ``x``'s dtype.

    Computes in float32 (float64 when ``x`` is float64): unpack and dequantize the whole weight,
    then one GEMM. Arguments as in :func:`tersa.kernels.w4a16_matmul.w4a16_matmul`.
    """
    check_w4a16_args(x, weight_packed, scale, zero_point, group_size, bias)
    codes = unpack_uint4(weight_packed, x.shape[-1])  # [N, K], q + 8
    return w4a16_matmul_codes(x, codes, scale, zero_point, group_size, bias, offset=8)
