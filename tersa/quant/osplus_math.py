"""OS+ math (Wei et al., EMNLP 2023): channel shift, threshold scale, threshold search, the loss.

Pure tensor-in, tensor-out functions; :mod:`tersa.quant.osplus` does the hooks and the block loop.

For a linear input ``X`` ``[N, C]`` with per-channel range ``[min_j, max_j]``:

- shift ``z_j = (max_j + min_j)/2`` centres every channel on 0;
- for a threshold ``t > 0``, ``s_j = max(1, max_j(X−z)/t, min_j(X−z)/(−t))``: only channels reaching
  outside ``[−t, t]`` are scaled, and exactly back onto it;
- the linear then computes ``Q(W·diag(s))·Q((X−z)/s) + b + W·z``, equal to ``W·X + b`` in full
  precision. ``t`` is the one scalar searched, on the quantized output error.

Everything is computed in float32 (float64 inputs stay float64), whatever the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tersa.quant.primitives import _MIN_SCALE, dequantize_weight, qrange, quantize_weight
from tersa.quant.scheme import ActivationScheme, WeightScheme


def _fp(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def channel_shift(x_min: torch.Tensor, x_max: torch.Tensor) -> torch.Tensor:
    """``z = (max + min)/2`` ``[C]``: the shift that makes every channel's range symmetric."""
    return (_fp(x_max) + _fp(x_min)) / 2


def channel_reach(x_min: torch.Tensor, x_max: torch.Tensor) -> torch.Tensor:
    """``r_j = max(max_j, −min_j, 0)`` ``[C]``: how far channel ``j`` reaches from 0."""
    return torch.maximum(_fp(x_max), -_fp(x_min)).clamp(min=0)


def threshold_scale(x_min: torch.Tensor, x_max: torch.Tensor, t: float) -> torch.Tensor:
    """``s_j = max(1, max_j/t, min_j/(−t))`` ``[C]`` for the (already shifted) range ``[min, max]``.

    Channels inside ``[−t, t]`` keep ``s = 1``; the others are scaled exactly onto it.
    """
    if not t > 0:
        raise ValueError(f"threshold must be positive, got {t}")
    return torch.maximum(_fp(x_max) / t, _fp(x_min) / -t).clamp(min=1.0)


def threshold_grid(reach: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` thresholds ``[steps]`` from ``max(reach)`` down to the smallest positive reach,
    evenly spaced in log scale.

    ``t = max(reach)`` scales nothing (``s = 1``). Below the smallest positive reach every live
    channel is scaled onto ``[−t, t]``, ``X̃`` only shrinks by the common factor ``t``, and the
    quantizers (min-max per tensor, token or output channel) are scale-equivariant: the loss no
    longer changes, so the grid stops there. Log spacing puts as many candidates among the
    ordinary channels (reach ~1) as among the rare outliers (reach ~100) — the paper's linear grid
    needs ``max/0.5`` steps for the same resolution near the bottom.
    """
    live = reach[reach > 0]
    if live.numel() == 0:
        return torch.empty(0, dtype=torch.float64)
    hi, lo = float(live.max()), float(live.min())
    if steps <= 1 or lo >= hi:
        return torch.tensor([hi], dtype=torch.float64)
    return torch.logspace(math.log10(hi), math.log10(lo), steps, dtype=torch.float64)


def refine_grid(grid: torch.Tensor, best: int, steps: int) -> torch.Tensor:
    """``steps`` new thresholds ``[steps]`` strictly between the neighbours of ``grid[best]``
    (log-spaced, ``grid[best]`` itself left out): a second, finer pass around the coarse optimum."""
    if steps <= 0 or grid.numel() < 2:
        return torch.empty(0, dtype=torch.float64)
    hi = float(grid[max(best - 1, 0)])
    lo = float(grid[min(best + 1, grid.numel() - 1)])
    inner = torch.logspace(math.log10(hi), math.log10(lo), steps + 3, dtype=torch.float64)[1:-1]
    centre = float(grid[best])
    keep = (inner - centre).abs() > 1e-9 * centre
    return inner[keep][:steps]


@dataclass(frozen=True)
class SearchResult:
    """The best threshold, its loss, and every ``(t, loss)`` evaluated (grid order)."""

    t: float
    loss: float
    history: list[tuple[float, float]]


def search_threshold(
    loss_at: Callable[[float], float], grid: torch.Tensor, refine: int = 0
) -> SearchResult:
    """The ``t`` of ``grid`` (then of a ``refine``-point grid around the coarse best) with the
    smallest ``loss_at(t)``; ties keep the larger ``t`` (less scaling)."""
    if grid.numel() == 0:
        raise ValueError("empty threshold grid")
    history = [(float(t), float(loss_at(float(t)))) for t in grid]
    best = min(range(len(history)), key=lambda k: (history[k][1], k))
    history += [(float(t), float(loss_at(float(t)))) for t in refine_grid(grid, best, refine)]
    t, loss = min(history, key=lambda h: (h[1], -h[0]))
    return SearchResult(t, loss, history)


# ------------------------------------------------------------------------------ quantized outputs


def _fake_quant(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with the min-max range ``[lo, hi]`` (broadcasting against ``x``).

    The arithmetic of :func:`~tersa.quant.primitives.compute_qparams`, ``quantize`` and
    ``dequantize`` (same results, bit for bit) without the int8 round trip: the search calls this
    a few hundred times per block.
    """
    qmin, qmax = qrange(bits)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_(min=_MIN_SCALE)
        return torch.round(x / scale).clamp_(qmin, qmax).mul_(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_(min=_MIN_SCALE)
    zero = (qmin - torch.round(lo / scale)).clamp_(qmin, qmax)
    return (torch.round(x / scale) + zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)


def fake_quant_weight(w: torch.Tensor, scheme: WeightScheme | None) -> torch.Tensor:
    """RTN quantize-dequantize of ``w`` ``[out, in]`` (unchanged when ``scheme`` is None)."""
    if scheme is None:
        return w
    if scheme.granularity == "group":
        return dequantize_weight(quantize_weight(w, scheme))
    dims = (1,) if scheme.granularity == "channel" else (0, 1)
    lo, hi = w.amin(dims, keepdim=True), w.amax(dims, keepdim=True)
    return _fake_quant(w, lo, hi, scheme.bits, scheme.symmetric)


def fake_quant_input(
    x: torch.Tensor,
    scheme: ActivationScheme | None,
    x_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Quantize-dequantize a linear input ``x`` ``[..., C]`` as the following quantize stage will.

    ``token``: dynamic per-token ranges. ``tensor``: one static range ``x_range = (lo, hi)``
    (scalars), the calibrated min/max of the whole input; the current ``x`` when None.
    """
    if scheme is None:
        return x
    if scheme.granularity == "token":
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:
        lo, hi = x_range if x_range is not None else (x.amin(), x.amax())
        lo, hi = lo.to(x.dtype), hi.to(x.dtype)
    return _fake_quant(x, lo, hi, scheme.bits, scheme.symmetric)


def migrated_range(
    x_min: torch.Tensor, x_max: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor range ``(lo, hi)`` of ``(X − z)/s`` given ``X``'s channel range ``[C]``."""
    z = 0.0 if shift is None else shift
    return ((_fp(x_min) - z) / scale).amin(), ((_fp(x_max) - z) / scale).amax()


def migrated_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    weights: WeightScheme | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(W·diag(s)), b + W·z)``: ``[out, in]`` and ``[out]`` for ``weight`` ``[out, in]``,
    ``bias`` ``[out]`` or None, ``scale``/``shift`` ``[in]``."""
    w = _fp(weight)
    b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if bias is None else _fp(bias)
    if shift is not None:
        b = b + w @ shift.to(w.dtype)
    return fake_quant_weight(w * scale.to(w.dtype)[None, :], weights), b


def migrated_input(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    activations: ActivationScheme | None,
    x_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``Q((x − z)/s)`` for ``x`` ``[..., in]``; ``x_range`` is the static range of ``(x − z)/s``
    (:func:`migrated_range`) for per-tensor activations."""
    xt = _fp(x)
    if shift is not None:
        xt = xt - shift.to(xt.dtype)
    return fake_quant_input(xt / scale.to(xt.dtype), activations, x_range)


def migrated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    weights: WeightScheme | None,
    activations: ActivationScheme | None,
    x_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``Q(W·diag(s))·Q((x − z)/s) + b + W·z`` ``[..., out]`` for ``x`` ``[..., in]``; equal to
    ``W·x + b`` in full precision (no schemes). Shapes as in :func:`migrated_weight`."""
    wq, b = migrated_weight(weight, bias, scale, shift, weights)
    return torch.nn.functional.linear(migrated_input(x, scale, shift, activations, x_range), wq, b)


def output_loss(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over tokens of the squared error summed over the last dim (``[..., D]`` each)."""
    return float((_fp(ref) - _fp(out)).pow(2).sum(-1).mean())


def reduce_repeated_heads(
    x_min: torch.Tensor, x_max: torch.Tensor, head_dim: int, n_rep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel range ``[heads·head_dim]`` of o_proj's input → ``[kv_heads·head_dim]`` of v's output.

    Under grouped-query attention head ``h`` reads kv head ``h // n_rep``; a scale on a v channel
    applies to all ``n_rep`` copies, so the range is the min/max over the copies.
    """
    if n_rep == 1:
        return x_min, x_max
    lo = x_min.view(-1, n_rep, head_dim).amin(1).reshape(-1)  # [kv, n_rep, hd] → [kv·hd]
    hi = x_max.view(-1, n_rep, head_dim).amax(1).reshape(-1)
    return lo, hi
