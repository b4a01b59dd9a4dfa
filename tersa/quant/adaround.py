"""AdaRound math (Nagel et al., 2020), as QDrop uses it: learned up/down rounding of weights.

A weight ``w`` with step ``s`` and zero point ``z`` is ``ŵ = s·(clamp(⌊w/s⌋ + h(V) + z, qmin,
qmax) − z)``. ``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)`` is the rectified sigmoid (ζ = 1.1,
γ = −0.1): it reaches exactly 0 and 1, so the soft weight can become the hard one. ``V`` starts
where ``h(V)`` equals the fractional part of ``w/s`` (the soft weight starts at ``w`` itself inside
the clamp range); hardening takes ``⌊w/s⌋ + 1[V ≥ 0]``. The regulariser
``Σ(1 − |2h(V) − 1|^β)`` pushes every ``h`` to 0 or 1 as β is annealed from 20 to 2.

Pure functions on tensors; :class:`~tersa.quant.qdrop_linear.QDropLinear` holds the state.
"""

from __future__ import annotations

import math

import torch

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid: h reaches 0 and 1 exactly


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)``, elementwise, differentiable inside (0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = rest`` for fractional parts ``rest ∈ [0, 1)`` (the inverse of ``h``).

    ``σ(V) = (rest − γ)/(ζ − γ)`` lies in ``(0.09, 0.92)``, so ``V`` is finite.
    """
    p = (rest - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p))


def hard_rounding(v: torch.Tensor) -> torch.Tensor:
    """The hardened up/down choice ``1[V ≥ 0]`` (``h(V) ≥ 0.5``) as 0/1 in ``v``'s dtype."""
    return (v >= 0).to(v.dtype)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ(1 − |2h(V) − 1|^β)``: 0 when every ``h`` is 0 or 1, largest at ``h = 0.5``."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def beta_schedule(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """β at ``step`` of ``total``: None during the warm-up (regulariser off), then linear decay
    from ``start`` to ``end`` over the remaining steps."""
    warm = int(warmup * total)
    if step < warm:
        return None
    span = max(total - warm, 1)
    return end + (start - end) * max(0.0, 1.0 - (step - warm) / span)


def cosine_lr(step: int, total: int) -> float:
    """Cosine decay factor from 1 at step 0 to 0 at ``total`` (LSQ steps' schedule)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def rounded_codes(
    floor: torch.Tensor, up: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
) -> torch.Tensor:
    """``clamp(⌊w/s⌋ + up + z, qmin, qmax)`` in float: ``up`` is ``h(V)`` (soft, differentiable in
    ``V``) or ``1[V ≥ 0]`` (hard). Shapes broadcast against ``floor: [out, in]``."""
    codes = floor + up
    if zero_point is not None:
        codes = codes + zero_point
    return torch.clamp(codes, qmin, qmax)
