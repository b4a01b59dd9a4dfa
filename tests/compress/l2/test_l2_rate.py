"""The rate estimate: the prefix-sum CDF against the pairwise definition (values and gradients),
the estimate against the empirical entropy of the rounded codes, its direction, and the entropy."""

from __future__ import annotations

import math

import pytest
import torch

from tersa.compress.l2.rate import (
    empirical_entropy,
    estimated_bits,
    sample_indices,
    sample_size,
    smoothed_cdf,
)


def pairwise_cdf(x: torch.Tensor, q: torch.Tensor, width: float, kernel: str) -> torch.Tensor:
    """The definition: F(q) = mean_j K((q − x_j)/δ), [n, m] at once."""
    u = ((q[:, None] - x[None, :]) / width).clamp(-1, 1)
    k = (u + 1) / 2 if kernel == "linear" else 0.5 - 0.5 * torch.cos(math.pi * (u + 1) / 2)
    return k.mean(1)


@pytest.mark.parametrize("kernel", ["cos", "linear"])
@pytest.mark.parametrize(("m", "n"), [(1, 1), (63, 500), (500, 63)])
def test_cdf_matches_the_pairwise_definition(kernel: str, m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(m, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    q = (torch.randn(n, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    outs = []
    for f in (smoothed_cdf, pairwise_cdf):
        x.grad = q.grad = None
        out = f(x, q, 0.5, kernel)
        (out * w).sum().backward()
        outs.append((out.detach(), x.grad.clone(), q.grad.clone()))
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel", ["cos", "linear"])
@pytest.mark.parametrize("dist", ["laplace", "normal"])
def test_estimate_is_within_2_percent_of_the_empirical_entropy(kernel: str, dist: str) -> None:
    """1M continuous codes (scale 3 Laplacian: ~4 bits; σ 1.5 normal: ~2.7 bits); the estimate
    uses its 1/128 sample (7,812 codes), the entropy all of them."""
    torch.manual_seed(0)
    if dist == "laplace":
        c = torch.distributions.Laplace(0.0, 3.0).sample((1_000_000,))
    else:
        c = torch.randn(1_000_000) * 1.5
    idx = sample_indices(c.numel(), torch.Generator().manual_seed(0))
    assert idx is not None and idx.numel() == 1_000_000 // 128
    exact = empirical_entropy(torch.round(c).long())
    assert estimated_bits(c[idx], 0.5, kernel).item() == pytest.approx(exact, rel=0.02)


def test_a_larger_step_lowers_the_estimate() -> None:
    w = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    step = torch.tensor(0.2, requires_grad=True)
    bits = estimated_bits(w / step)
    bits.backward()
    assert 3.0 < bits.item() < 5.0
    assert step.grad < 0  # coarser codes cost fewer bits


def test_empirical_entropy() -> None:
    assert empirical_entropy(torch.arange(8).repeat(100)) == pytest.approx(3.0)
    assert empirical_entropy(torch.zeros(10, dtype=torch.int8)) == 0.0
    assert empirical_entropy(torch.tensor([], dtype=torch.int64)) == 0.0
    # far-apart symbols (counted by sorting, not a histogram)
    assert empirical_entropy(torch.tensor([-(2**30), 2**30, 0, 5])) == pytest.approx(2.0)


def test_sample_size_follows_the_paper() -> None:
    assert sample_size(128 * 128) == 128 * 128
    assert sample_size(128 * 128 + 1) == 128
    assert sample_size(576 * 1536) == 576 * 1536 // 128
    assert sample_indices(100) is None
