"""Quantization math: qparams, (fake) quantization, weight quantization, int32 packing.

Pure tensor-in, tensor-out functions with no modules and no state. The conventions are the ones in
:mod:`tersa.quant.scheme` (signed int8 codes, ``x̂ = (q - z) · s``, asymmetric ranges include 0).

Arithmetic runs in float32 (float64 when the input is float64): fp16 is never computed on CPU, and
float32 keeps ``x / s`` rounding identical across devices. Results come back in the caller's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tersa.quant.scheme import WeightScheme

# Smallest scale ever produced. Far below any real weight or activation step, it only keeps
# ``x / s`` finite when a range is empty (an all-zero row, a constant token).
_MIN_SCALE = 1e-10


def qrange(bits: int) -> tuple[int, int]:
    """The signed code range ``(-2^(b-1), 2^(b-1) - 1)`` for ``bits`` bits."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8 (int8 codes), got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def compute_qparams(
    x_min: torch.Tensor,
    x_max: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for observed ranges ``[x_min, x_max]`` (broadcasting shapes).

    Symmetric: ``s = max(|min|, |max|) / (2^(b-1) - 1)``, ``z = 0``. Asymmetric: the range is
    widened to include 0, ``s = (max - min) / (2^b - 1)``, ``z = -2^(b-1) - round(min / s)``
    clamped into the code range, so 0 is exactly representable. ``s`` is never below a tiny
    positive floor.

    :param scale_dtype: dtype the scale will be stored in (default float32). The scale is rounded to
        it *before* the zero point is derived, so zero point and codes agree with the stored scale.
    :returns: ``scale`` (``scale_dtype``) and ``zero_point`` (int8; zeros when symmetric), both of
        the broadcast shape of ``x_min`` and ``x_max``.
    """
    qmin, qmax = qrange(bits)
    dt = _compute_dtype(x_min, x_max)
    lo = torch.clamp(x_min.to(dt), max=0.0)
    hi = torch.clamp(x_max.to(dt), min=0.0)
    scale = torch.maximum(-lo, hi) / qmax if symmetric else (hi - lo) / (qmax - qmin)
    scale = _round_scale(torch.clamp(scale, min=_MIN_SCALE), scale_dtype or torch.float32)
    if symmetric:
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
    else:
        zp = qmin - torch.round(lo / scale.to(dt))
        zero_point = torch.clamp(zp, qmin, qmax).to(torch.int8)
    return scale, zero_point


def _round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a positive scale to ``dtype``, clamped so it cannot underflow to 0 (fp16 can)."""
    if dtype.is_floating_point and torch.finfo(dtype).tiny > _MIN_SCALE:
        scale = torch.clamp(scale, min=torch.finfo(dtype).tiny)
    return scale.to(dtype)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, qmin, qmax)`` as int8 (round half to even).

    ``scale`` and ``zero_point`` broadcast against ``x``; ``zero_point=None`` means 0.
    """
    qmin, qmax = qrange(bits)
    dt = _compute_dtype(x, scale)
    q = torch.round(x.to(dt) / scale.to(dt))
    if zero_point is not None:
        q = q + zero_point.to(dt)
    return torch.clamp(q, qmin, qmax).to(torch.int8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """``(q - z) · s`` in ``scale``'s dtype (computed in float32). ``zero_point=None`` means 0."""
    dt = _compute_dtype(scale)
    x = q.to(dt)
    if zero_point is not None:
        x = x - zero_point.to(dt)
    return (x * scale.to(dt)).to(scale.dtype)


# ---------------------------------------------------------------------------------------- weights


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized ``[out, in]`` weight.

    ``codes``: int8 ``[out, in]``. ``scale``: ``[1, 1]`` (tensor), ``[out, 1]`` (channel) or
    ``[out, G]`` with ``G = ceil(in / group_size)`` (group). ``zero_point``: int8, same shape as
    ``scale``, or None when symmetric. ``group_size``: inputs per group, None unless grouped.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group_size: int | None
    bits: int


def num_groups(in_features: int, group_size: int) -> int:
    """Number of input groups; the last one is shorter when ``group_size`` does not divide."""
    return math.ceil(in_features / group_size)


def scale_shape(out_features: int, in_features: int, scheme: WeightScheme) -> tuple[int, int]:
    """Shape of the weight scale and zero point: ``[1, 1]``, ``[out, 1]`` or ``[out, G]``."""
    if scheme.granularity == "tensor":
        return (1, 1)
    if scheme.granularity == "channel":
        return (out_features, 1)
    assert scheme.group_size is not None  # enforced by WeightScheme
    return (out_features, num_groups(in_features, scheme.group_size))


def group_min_max(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of ``w: [out, in]`` -> two ``[out, G]``."""
    out_f, in_f = w.shape
    n_full = in_f // group_size
    full = w[:, : n_full * group_size].reshape(out_f, n_full, group_size)  # [out, n_full, g]
    mins, maxs = [full.amin(dim=2)], [full.amax(dim=2)]
    if in_f > n_full * group_size:  # the tail gets its own range: no padding enters min/max
        tail = w[:, n_full * group_size :]
        mins.append(tail.amin(dim=1, keepdim=True))
        maxs.append(tail.amax(dim=1, keepdim=True))
    return torch.cat(mins, dim=1), torch.cat(maxs, dim=1)


def weight_qparams(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of a weight ``w: [out, in]``.

    :returns: ``scale`` in ``w``'s dtype and int8 ``zero_point``, both of
        :func:`scale_shape` — ``[1, 1]`` (tensor), ``[out, 1]`` (channel) or ``[out, G]`` (group).
        Groups run along the input dimension.
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if scheme.granularity == "tensor":
        w_min, w_max = w.amin().reshape(1, 1), w.amax().reshape(1, 1)
    elif scheme.granularity == "channel":
        w_min, w_max = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        assert scheme.group_size is not None
        w_min, w_max = group_min_max(w, scheme.group_size)
    return compute_qparams(w_min, w_max, scheme.bits, scheme.symmetric, scale_dtype=w.dtype)


def expand_groups(t: torch.Tensor, group_size: int | None, in_features: int) -> torch.Tensor:
    """Expand per-group parameters ``[out, G]`` to ``[out, in]``; other shapes are returned as is.

    ``[1, 1]`` and ``[out, 1]`` already broadcast against ``[out, in]``.
    """
    if group_size is None:
        return t
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_weight(w: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w: [out, in]`` with min-max ranges."""
    scale, zero_point = weight_qparams(w, scheme)
    group_size = scheme.group_size if scheme.granularity == "group" else None
    in_f = w.shape[1]
    zp = None if scheme.symmetric else zero_point
    codes = quantize(
        w,
        expand_groups(scale, group_size, in_f),
        None if zp is None else expand_groups(zp, group_size, in_f),
        scheme.bits,
    )
    return QuantizedWeight(codes, scale, zp, group_size, scheme.bits)


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The float weight ``[out, in]`` (in the scale's dtype) that ``qw`` represents."""
    in_f = qw.codes.shape[1]
    scale = expand_groups(qw.scale, qw.group_size, in_f)
    zp = None if qw.zero_point is None else expand_groups(qw.zero_point, qw.group_size, in_f)
    return dequantize(qw.codes, scale, zp)


# ------------------------------------------------------------------------------------ activations


def fake_quantize_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Dynamic per-token quantize-dequantize of ``x: [..., K]`` (one range per row of K values).

    Per-token scales stay in float32, as a W8A8 kernel computes them. Returns ``x``'s shape and
    dtype.
    """
    dt = _compute_dtype(x)
    xf = x.to(dt)
    scale, zp = compute_qparams(
        xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True), bits, symmetric, dt
    )
    zp_or_none = None if symmetric else zp
    return dequantize(quantize(xf, scale, zp_or_none, bits), scale, zp_or_none).to(x.dtype)


def fake_quantize_static(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with fixed (calibrated) parameters; keeps shape and dtype."""
    dt = _compute_dtype(x, scale)
    s = scale.to(dt)
    return dequantize(quantize(x, s, zero_point, bits), s, zero_point).to(x.dtype)


# ---------------------------------------------------------------------------------------- packing


def packed_width(in_features: int, bits: int) -> int:
    """int32 words per row: ``ceil(in / (32 // bits))``."""
    return math.ceil(in_features / (32 // bits))


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes ``[..., in]`` into int32 words ``[..., ceil(in / (32 // bits))]``.

    compressed-tensors ``pack-quantized`` layout: each code is offset by ``2^(b-1)`` to an
    unsigned value in ``[0, 2^b - 1]``, and ``32 // bits`` of them share a word, the first in the
    lowest bits.
    Unused high bits and the padding of a short last word are zero.
    """
    qmin, qmax = qrange(bits)
    if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise ValueError(f"codes outside the {bits}-bit range [{qmin}, {qmax}]")
    per_word = 32 // bits
    in_f = codes.shape[-1]
    n_words = packed_width(in_f, bits)
    u = codes.to(torch.int64) - qmin  # [..., in], unsigned
    u = torch.nn.functional.pad(u, (0, n_words * per_word - in_f))
    u = u.reshape(*codes.shape[:-1], n_words, per_word)  # [..., W, per_word]
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (u << shifts).sum(dim=-1)  # fields don't overlap, so sum == bitwise or
    # int64 in [0, 2^32) -> the int32 with the same 32 bits (two's complement)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[..., W]`` -> int8 codes ``[..., in_features]``."""
    qmin, _ = qrange(bits)
    per_word = 32 // bits
    if packed.shape[-1] != packed_width(in_features, bits):
        raise ValueError(
            f"packed width {packed.shape[-1]} does not match in_features={in_features} at "
            f"{bits} bits (expected {packed_width(in_features, bits)})"
        )
    words = packed.to(torch.int64) & 0xFFFFFFFF  # undo the sign extension of the int32 view
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    u = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, per_word]
    u = u.reshape(*packed.shape[:-1], -1)[..., :in_features]
    return (u + qmin).to(torch.int8)
