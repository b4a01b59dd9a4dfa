"""OS+ math on hand-made tensors: shift, threshold scale, grids, search, quantized-output loss."""

from __future__ import annotations

import math

import pytest
import torch

from tersa.quant.osplus_math import (
    channel_reach,
    channel_shift,
    fake_quant_input,
    fake_quant_weight,
    migrated_linear,
    migrated_range,
    output_loss,
    reduce_repeated_heads,
    refine_grid,
    search_threshold,
    threshold_grid,
    threshold_scale,
)
from tersa.quant.primitives import (
    compute_qparams,
    dequantize_weight,
    fake_quantize_per_token,
    fake_quantize_static,
    quantize_weight,
)
from tersa.quant.scheme import ActivationScheme, WeightScheme

W6 = WeightScheme(bits=6)
A6 = ActivationScheme(bits=6)


def test_shift_centres_each_channel() -> None:
    x_min = torch.tensor([-1.0, 2.0, -10.0, 0.0])
    x_max = torch.tensor([3.0, 4.0, -2.0, 0.0])
    assert channel_shift(x_min, x_max).tolist() == [1.0, 3.0, -6.0, 0.0]
    assert channel_reach(x_min, x_max).tolist() == [3.0, 4.0, 10.0, 0.0]


def test_threshold_scale_leaves_channels_inside_alone() -> None:
    # shifted ranges: inside [-2, 2]; above; below; both sides out (the larger side wins); zero
    x_min = torch.tensor([-1.5, -1.0, -8.0, -6.0, 0.0])
    x_max = torch.tensor([2.0, 5.0, 1.0, 4.0, 0.0])
    s = threshold_scale(x_min, x_max, 2.0)
    assert s.tolist() == [1.0, 2.5, 4.0, 3.0, 1.0]
    # every scaled channel lands exactly on [-t, t]
    assert (x_max / s).max() <= 2.0 and (x_min / s).min() >= -2.0
    with pytest.raises(ValueError, match="threshold must be positive"):
        threshold_scale(x_min, x_max, 0.0)


def test_threshold_grid_is_log_spaced_between_the_reaches() -> None:
    reach = torch.tensor([0.0, 0.5, 2.0, 50.0])
    grid = threshold_grid(reach, 5)
    assert grid[0].item() == pytest.approx(50.0) and grid[-1].item() == pytest.approx(0.5)
    ratios = grid[:-1] / grid[1:]
    assert torch.allclose(ratios, torch.full_like(ratios, 100 ** (1 / 4)))
    assert threshold_grid(torch.zeros(3), 5).numel() == 0
    assert threshold_grid(torch.ones(3), 5).tolist() == [1.0]


def test_refine_grid_lies_between_the_neighbours() -> None:
    grid = threshold_grid(torch.tensor([1.0, 100.0]), 5)  # 100, 31.6, 10, 3.16, 1
    fine = refine_grid(grid, 2, 6)
    assert fine.numel() == 6
    assert (fine < grid[1]).all() and (fine > grid[3]).all()
    assert not torch.isclose(fine, grid[2:3]).any()
    assert refine_grid(grid, 0, 3).max() < grid[0]  # at the edge: between grid[0] and grid[1]


def test_search_finds_the_analytic_optimum() -> None:
    best = 3.7

    def loss(t: float) -> float:
        return (math.log(t) - math.log(best)) ** 2

    grid = threshold_grid(torch.tensor([0.5, 100.0]), 12)
    coarse = search_threshold(loss, grid)
    fine = search_threshold(loss, grid, refine=8)
    step = float(grid[0] / grid[1])  # coarse grid ratio; the refinement is 9x finer
    assert abs(math.log(coarse.t / best)) <= math.log(step) / 2 + 1e-9
    assert abs(math.log(fine.t / best)) <= math.log(step) / 9 + 1e-9
    assert fine.loss <= coarse.loss and len(fine.history) == 12 + 8


def test_search_keeps_the_larger_threshold_on_ties() -> None:
    grid = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    assert search_threshold(lambda t: 1.0, grid, refine=2).t == 8.0


def test_migrated_linear_is_exact_without_quantization() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 12, generator=g, dtype=torch.float64)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    s = torch.rand(12, generator=g, dtype=torch.float64) * 4 + 0.5
    z = torch.randn(12, generator=g, dtype=torch.float64)
    out = migrated_linear(x, w, b, s, z, None, None)
    torch.testing.assert_close(out, x @ w.T + b, rtol=1e-12, atol=1e-12)


def test_static_activation_range_follows_the_candidate() -> None:
    x_min, x_max = torch.tensor([-1.0, -40.0]), torch.tensor([2.0, 10.0])
    s = threshold_scale(x_min, x_max, 4.0)  # [1, 10]
    lo, hi = migrated_range(x_min, x_max, s, None)
    assert (lo.item(), hi.item()) == (-4.0, 2.0)
    x = torch.tensor([[2.0, -4.0], [0.03, 0.0]])
    static = ActivationScheme(bits=8, granularity="tensor")
    # one scale from the given range, not from x: step 6/255, so 0.03 rounds to 1 step
    q = fake_quant_input(
        x, ActivationScheme(bits=8, granularity="tensor", symmetric=False), (lo, hi)
    )
    assert q[1, 0].item() == pytest.approx(6 / 255, rel=1e-5)
    assert fake_quant_input(x, static).shape == x.shape


def _outlier_data(scale: float = 50.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    x[:, 3] *= scale  # a planted outlier channel, as after an LLM norm
    w = torch.randn(16, 32, generator=g) / 6
    b = torch.randn(16, generator=g) / 10
    return x, w, b


def test_search_beats_no_scaling_on_a_planted_outlier() -> None:
    x, w, b = _outlier_data()
    ref = x @ w.T + b
    x_min, x_max = x.amin(0), x.amax(0)

    def loss(t: float) -> float:
        s = threshold_scale(x_min, x_max, t)
        return output_loss(ref, migrated_linear(x, w, b, s, None, W6, A6))

    grid = threshold_grid(channel_reach(x_min, x_max), 40)
    best = search_threshold(loss, grid, refine=8)
    unscaled = loss(float(grid[0]))  # t = max reach: s = 1 everywhere
    assert unscaled == pytest.approx(
        output_loss(ref, migrated_linear(x, w, b, torch.ones(32), None, W6, A6))
    )
    assert best.loss < 0.1 * unscaled  # measured: 23x lower
    assert best.t < float(grid[0])


def test_loss_is_flat_below_the_smallest_reach() -> None:
    # The grid's floor: once every channel is scaled, X̃ only shrinks by the common factor t and the
    # min-max quantizers are scale-equivariant.
    x, w, b = _outlier_data()
    x_min, x_max = x.amin(0), x.amax(0)
    floor = float(channel_reach(x_min, x_max).min())
    ref = x @ w.T + b
    losses = [
        output_loss(ref, migrated_linear(x, w, b, threshold_scale(x_min, x_max, t), None, W6, A6))
        for t in (floor, floor / 2, floor / 8)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert losses[2] == pytest.approx(losses[0], rel=1e-3)


def test_output_loss_sums_channels_and_averages_tokens() -> None:
    ref = torch.zeros(2, 3, 4)
    out = torch.ones(2, 3, 4)
    out[0, 0] = 3.0
    assert output_loss(ref, out) == pytest.approx((6 * 4 - 4 + 36) / 6)


def test_repeated_heads_reduce_to_kv_channels() -> None:
    # 2 kv heads x 2 repeats, head_dim 2: o_proj channels [h0 h1 | h2 h3], h0 and h1 read kv 0
    x_min = torch.tensor([-1.0, -5.0, -2.0, -1.0, 0.0, -3.0, -4.0, 0.0])
    x_max = torch.tensor([1.0, 2.0, 3.0, 0.0, 7.0, 1.0, 2.0, 9.0])
    lo, hi = reduce_repeated_heads(x_min, x_max, head_dim=2, n_rep=2)
    assert lo.tolist() == [-2.0, -5.0, -4.0, -3.0]
    assert hi.tolist() == [3.0, 2.0, 7.0, 9.0]
    assert reduce_repeated_heads(x_min, x_max, 2, 1) == (x_min, x_max)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_fast_fake_quant_matches_the_primitives_bit_for_bit(bits: int, symmetric: bool) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 37, 23, generator=g) * torch.rand(23, generator=g) * 10 + 0.5
    act = ActivationScheme(bits=bits, symmetric=symmetric)
    assert torch.equal(fake_quant_input(x, act), fake_quantize_per_token(x, bits, symmetric))
    static = ActivationScheme(bits=bits, granularity="tensor", symmetric=symmetric)
    lo, hi = torch.tensor(-3.0), torch.tensor(7.5)
    scale, zp = compute_qparams(lo, hi, bits, symmetric, x.dtype)
    expected = fake_quantize_static(x, scale, None if symmetric else zp, bits)
    assert torch.equal(fake_quant_input(x, static, (lo, hi)), expected)
    w = torch.randn(19, 45, generator=g)
    for granularity, group in (("channel", None), ("tensor", None), ("group", 16)):
        scheme = WeightScheme(
            bits=bits, granularity=granularity, group_size=group, symmetric=symmetric
        )
        assert torch.equal(
            fake_quant_weight(w, scheme), dequantize_weight(quantize_weight(w, scheme))
        )
