"""Fit math: optimal (weighted) truncated SVD, damped moments and solves, the output error."""

from __future__ import annotations

import pytest
import torch

from tersa.structured.fit_math import (
    damped_cholesky,
    fit_left,
    lowrank_factors,
    output_error,
    second_moment,
)

F64 = torch.float64


def weighted_sq_error(w: torch.Tensor, fitted: torch.Tensor, c: torch.Tensor) -> float:
    e = w - fitted
    return float(torch.trace(e @ c @ e.t()))


def test_plain_factors_are_eckart_young() -> None:
    w = torch.randn(10, 14, dtype=F64)
    u, v = lowrank_factors(w, 3)
    s = torch.linalg.svdvals(w)
    assert float((w - u @ v).square().sum()) == pytest.approx(float(s[3:].square().sum()))
    # the singular values are split evenly between the factors
    torch.testing.assert_close(u.norm(dim=0), v.norm(dim=1))


def test_weighted_factors_reach_the_weighted_optimum() -> None:
    w = torch.randn(10, 14, dtype=F64)
    x = torch.randn(200, 14, dtype=F64) * torch.logspace(-1, 1, 14, dtype=F64)
    c = second_moment(x, 0.0)
    u, v = lowrank_factors(w, 3, c)
    tail = torch.linalg.svdvals(w @ torch.linalg.cholesky(c))[3:].square().sum()
    assert weighted_sq_error(w, u @ v, c) == pytest.approx(float(tail), rel=1e-9)
    # and the weighted error is the calibration output error
    err = output_error(w, u @ v, x)
    assert err**2 == pytest.approx(float(tail) / float(torch.trace(w @ c @ w.t())), rel=1e-9)


def test_rank_above_the_matrix_rank_pads_with_zeros() -> None:
    w = torch.randn(4, 6, dtype=F64)
    u, v = lowrank_factors(w, 5)
    assert u.shape == (4, 5) and v.shape == (5, 6)
    assert torch.equal(u[:, 4], torch.zeros(4, dtype=F64)) and output_error(w, u @ v) < 1e-12


def test_second_moment_is_damped_relative_to_its_scale() -> None:
    x = torch.randn(3, 8, dtype=F64) * 1e3  # 3 samples for 8 features: XᵀX is singular
    c = second_moment(x, 1e-6)
    plain = x.t() @ x / 3
    torch.testing.assert_close(c - plain, 1e-6 * plain.diagonal().mean() * torch.eye(8, dtype=F64))
    assert torch.linalg.cholesky_ex(c).info == 0


def test_left_fit_zeroes_the_gradient() -> None:
    w, h = torch.randn(6, 9, dtype=F64), torch.randn(3, 9, dtype=F64)
    c = second_moment(torch.randn(50, 9, dtype=F64), 1e-6)
    u = fit_left(w, h, c).requires_grad_()
    loss = torch.trace((w - u @ h) @ c @ (w - u @ h).t())
    (grad,) = torch.autograd.grad(loss, u)
    assert float(grad.norm()) < 1e-9 * float(w.norm())


def test_errors() -> None:
    with pytest.raises(ValueError) as err:
        second_moment(torch.zeros(0, 4), 1e-6)
    assert str(err.value) == "calibration inputs x have no rows"
    with pytest.raises(ValueError) as err:
        damped_cholesky(-torch.eye(3, dtype=F64))
    assert str(err.value) == "the Gram matrix (3, 3) is not positive semi-definite"


def test_output_error() -> None:
    w = torch.randn(5, 4, dtype=F64)
    assert output_error(w, 1.1 * w) == pytest.approx(0.1)
    x = torch.randn(7, 4, dtype=F64)
    assert output_error(w, 0.5 * w, x) == pytest.approx(0.5)
    assert output_error(w, w, x) == 0.0
