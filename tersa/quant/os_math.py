"""Outlier Suppression math (Wei et al., NeurIPS 2022): pure tensor functions, no hooks or state.

- Gamma migration: the norm's ``γ`` moves into the consumers' input columns; the quantizers see
  ``x′ = LN(x)/|γ|``. :func:`gamma_scale` is the per-channel scale handed to ``migrate_group``.
- Token-wise clipping (coarse stage): for a quantile ``α`` the clipping range of one linear's input
  is ``[quantile(token minima, 1−α), quantile(token maxima, α)]`` (:func:`clip_range`); ``α`` is
  searched on a grid from 1.0 down (:func:`alpha_grid`) by the error of the model's final outputs.
"""

from __future__ import annotations

import math

import torch

# |γ| below this stays in the norm (dividing by ~0 would blow the consumers' columns up). Real
# LayerNorm gains are O(0.01–10); a gain this small marks a dead channel.
GAMMA_FLOOR = 1e-5

# Lowest α searched per activation bit width, from the paper's candidate counts
# ({8b: 0.1, 6b: 0.3, 4b: 0.9} / step below 1.0); 5 and 7 bits are interpolated.
MIN_ALPHA = {8: 0.9, 7: 0.8, 6: 0.7, 5: 0.4, 4: 0.1}


def gamma_scale(gamma: torch.Tensor, floor: float = GAMMA_FLOOR) -> torch.Tensor:
    """``|γ|`` clamped to ``floor`` ``[C]``, float32.

    Migrating ``|γ|`` rather than ``γ`` keeps the scale positive (quantizer ranges and the
    ``(x − z)/s`` transforms assume ``s > 0``): the norm keeps ``sign(γ)``, so in a pre-norm block
    its weight becomes ``±1`` (``γ/floor`` for ``|γ| < floor``).
    """
    return gamma.detach().abs().float().clamp(min=floor)


def token_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token maximum and minimum over the channels of ``x`` ``[..., C]``: two ``[N]`` float32
    tensors, ``N`` the number of tokens."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()  # [N, C]
    return flat.amax(-1), flat.amin(-1)


def quantile_sorted(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of ascending ``[N]`` values with linear interpolation (``torch.quantile``
    semantics, which refuses more than 2^24 elements)."""
    n = sorted_values.numel()
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


def clip_range(
    sorted_max: torch.Tensor, sorted_min: torch.Tensor, alpha: float
) -> tuple[float, float]:
    """The clipping range ``(lo, hi)`` at quantile ``α`` from ascending per-token maxima and minima
    ``[N]``: ``hi = quantile(max, α)``, ``lo = quantile(min, 1 − α)``. ``α = 1`` is the min-max
    range. ``lo ≤ hi`` always holds."""
    hi = float(quantile_sorted(sorted_max, alpha))
    lo = float(quantile_sorted(sorted_min, 1.0 - alpha))
    return min(lo, hi), max(lo, hi)


def alpha_grid(bits: int, step: float = 0.01, min_alpha: float | None = None) -> list[float]:
    """Candidate ``α`` from 1.0 down to ``min_alpha`` (default by bit width, :data:`MIN_ALPHA`)
    in steps of ``step``, rounded to 6 decimals."""
    floor = MIN_ALPHA[min(max(bits, 4), 8)] if min_alpha is None else min_alpha
    n = math.floor((1.0 - floor) / step + 1e-9)
    return [round(1.0 - k * step, 6) for k in range(n + 1)]


def output_mse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean squared error of the model's final outputs (logits) ``[B, T, V]``, in float64."""
    return float((out.double() - ref.double()).pow(2).mean())
