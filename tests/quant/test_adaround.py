"""AdaRound math: the rectified sigmoid, its inverse, hardening, regulariser and β schedule."""

from __future__ import annotations

import pytest
import torch

from tersa.quant.adaround import (
    beta_schedule,
    hard_rounding,
    init_rounding,
    rectified_sigmoid,
    rounded_codes,
    rounding_regularizer,
)


def test_init_rounding_inverts_the_rectified_sigmoid() -> None:
    rest = torch.rand(1000, dtype=torch.float64) * 0.999
    v = init_rounding(rest)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(rectified_sigmoid(v), rest, rtol=0, atol=1e-12)


def test_initial_hardening_is_round_to_nearest() -> None:
    w = torch.randn(64, 40) * 3
    floor = torch.floor(w)
    v = init_rounding(w - floor)
    codes = rounded_codes(floor, hard_rounding(v), None, -128, 127)
    # Exactly 0.5 fractions (none in random data) would round up here, half-to-even in RTN.
    torch.testing.assert_close(codes, torch.round(w), rtol=0, atol=0)


def test_rectified_sigmoid_reaches_zero_and_one() -> None:
    assert rectified_sigmoid(torch.tensor([-10.0])).item() == 0.0
    assert rectified_sigmoid(torch.tensor([10.0])).item() == 1.0
    assert rectified_sigmoid(torch.tensor([0.0])).item() == pytest.approx(0.5)


def test_regularizer_is_zero_at_binary_and_counts_undecided_entries() -> None:
    v = torch.tensor([-20.0, 20.0, -20.0])
    assert rounding_regularizer(v, 2.0).item() == 0.0
    half = torch.zeros(7)  # h = 0.5: each entry contributes 1 − 0^β = 1
    assert rounding_regularizer(half, 20.0).item() == pytest.approx(7.0)


def test_beta_schedule_is_off_in_warmup_then_decays_linearly() -> None:
    total, warm = 100, 0.2
    assert all(beta_schedule(s, total, warm, 20.0, 2.0) is None for s in range(20))
    assert beta_schedule(20, total, warm, 20.0, 2.0) == pytest.approx(20.0)
    assert beta_schedule(60, total, warm, 20.0, 2.0) == pytest.approx(11.0)
    assert beta_schedule(99, total, warm, 20.0, 2.0) == pytest.approx(2.0 + 18.0 / 80)


def test_codes_clamp_into_the_range_with_zero_point() -> None:
    floor = torch.tensor([[-9.0, 0.0, 6.0]])
    zp = torch.tensor([[1.0]])
    codes = rounded_codes(floor, torch.ones(1, 3), zp, -8, 7)
    assert codes.tolist() == [[-7.0, 2.0, 7.0]]
