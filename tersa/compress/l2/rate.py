"""The rate of integer codes: a differentiable estimate and the exact empirical entropy.

The estimate follows L2: a kernel-smoothed CDF ``F`` of the continuous codes ``c``,
``F(q) = (1/m) Σ_j K((q − c_j)/δ)`` with ``K`` rising from 0 at ``−1`` to 1 at ``+1`` (``linear``:
a straight ramp, the CDF of a box kernel; ``cos``: ``½ − ½cos(π(u + 1)/2)``, the CDF of a cosine
bump), gives each rounded code ``ĉ`` the probability ``p(ĉ) = F(ĉ + ½) − F(ĉ − ½)`` (the smoothed
mass of its rounding bin), and the rate is ``Σ −log₂ p(ĉ)`` bits. Gradients reach the codes both as
samples of ``F`` and as queries (through the straight-through rounding).

``δ`` is a half-width in code units (the paper uses ``(max − min)/64`` of the sampled codes, which
for heavy-tailed LLM weights spans several bins and follows the outliers; a fixed width below one
bin keeps ``p`` close to the bin frequencies the entropy coder will see). Tensors over
``128²`` elements are estimated on a random ``1/128`` of them, as in the paper.

``F`` is evaluated for all queries at once from sorted samples and prefix sums (``searchsorted``
finds each query's window ``[q − δ, q + δ]``; a window's kernel sum is closed-form in prefix sums of
``c`` (linear) or of ``cos(θc)`` and ``sin(θc)`` (cos)), so a step costs ``O((m + n) log m)`` in
time and ``O(m + n)`` in memory instead of ``m·n``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Kernel = Literal["cos", "linear"]
KERNELS: tuple[Kernel, ...] = ("cos", "linear")
SUBSAMPLE_ABOVE = 128 * 128  # tensors larger than this are estimated on a 1/128 sample
SUBSAMPLE_RATE = 128
_MIN_P = 1e-12  # floor of a probability before log2 (each code's own sample keeps p ≥ ½/m)


def smoothed_cdf(
    samples: torch.Tensor, queries: torch.Tensor, width: float, kernel: Kernel = "cos"
) -> torch.Tensor:
    """``F(q)`` of the kernel-smoothed empirical distribution of ``samples`` ``[m]`` at
    ``queries`` ``[n]``: ``[n]`` in ``[0, 1]``, float64, differentiable in both.

    :param width: kernel half-width ``δ > 0`` (a sample at ``x`` counts fully for ``q ≥ x + δ``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    x = torch.sort(samples.reshape(-1).double()).values  # [m]
    q = queries.reshape(-1).double()  # [n]
    m = x.numel()
    lo = torch.searchsorted(x.detach(), q.detach() - width)  # samples below the window
    hi = torch.searchsorted(x.detach(), q.detach() + width, right=True)  # ... and within it
    inside = (hi - lo).double()
    if kernel == "linear":
        s = F.pad(torch.cumsum(x, 0), (1, 0))  # [m + 1]
        window = (inside * (q + width) - (s[hi] - s[lo])) / (2 * width)
    else:
        theta = math.pi / (2 * width)
        cos_sum = F.pad(torch.cumsum(torch.cos(theta * x), 0), (1, 0))
        sin_sum = F.pad(torch.cumsum(torch.sin(theta * x), 0), (1, 0))
        a = theta * (q + width)  # Σ cos(a − θx_j) = cos a Σ cos θx_j + sin a Σ sin θx_j
        cos_part = torch.cos(a) * (cos_sum[hi] - cos_sum[lo])
        sin_part = torch.sin(a) * (sin_sum[hi] - sin_sum[lo])
        window = 0.5 * inside - 0.5 * (cos_part + sin_part)
    return (lo.double() + window) / m


def code_bits(
    c: torch.Tensor, codes: torch.Tensor, width: float, kernel: Kernel = "cos"
) -> torch.Tensor:
    """``−log₂ p(ĉ)`` ``[n]`` of the rounded ``codes`` ``[n]`` under the smoothed distribution of
    the continuous codes ``c`` ``[n]`` (float32)."""
    upper = smoothed_cdf(c, codes + 0.5, width, kernel)
    lower = smoothed_cdf(c, codes - 0.5, width, kernel)
    return -torch.log2((upper - lower).clamp_min(_MIN_P)).float()


def sample_size(numel: int) -> int:
    """Elements the estimate uses for a tensor of ``numel``: all up to ``128²``, else ``1/128``."""
    return numel if numel <= SUBSAMPLE_ABOVE else numel // SUBSAMPLE_RATE


def sample_indices(numel: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Random flat indices (with replacement) of the :func:`sample_size` elements the estimate of
    a ``numel`` tensor uses, or None to use them all."""
    n = sample_size(numel)
    return None if n == numel else torch.randint(numel, (n,), generator=generator)


def estimated_bits(c: torch.Tensor, width: float = 0.5, kernel: Kernel = "cos") -> torch.Tensor:
    """Estimated bits per code of the continuous codes ``c`` (any shape; pass a sample of a large
    tensor, see :func:`sample_indices`) once rounded with straight-through rounding: a
    differentiable scalar."""
    flat = c.reshape(-1)
    codes = flat + (torch.round(flat) - flat).detach()
    return code_bits(flat, codes, width, kernel).mean()


def symbol_counts(codes: torch.Tensor) -> torch.Tensor:
    """How often each distinct value of the integer ``codes`` occurs (the zero counts dropped)."""
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return flat
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo < 4 * flat.numel() + 1024:  # a dense histogram is cheaper than sorting
        counts = torch.bincount(flat - lo)
        return counts[counts > 0]
    return torch.unique(flat, return_counts=True)[1]


def empirical_entropy(codes: torch.Tensor) -> float:
    """The empirical entropy of the integer ``codes`` in bits per symbol: what a static entropy
    coder with the tensor's own frequency table reaches (table excluded)."""
    counts = symbol_counts(codes).double()
    if counts.numel() <= 1:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * torch.log2(p)).sum())
