"""Structured layers: drop-in shapes, parameter and FLOP formulas, and fits to dense weights
(exact recovery of matrices that have the structure, activation-aware LowRank)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tersa.structured.base import StructuredLinear
from tersa.structured.block_math import block_diag_dense, blockshuffle_dense
from tersa.structured.layers import BlockDense, BlockShuffle, LowRank

F64 = torch.float64
SHAPES = [(12, 18), (18, 12), (16, 16), (24, 8)]  # (in, out): all divisible by 2
MORE_BLOCKS = {(12, 18): 3, (18, 12): 3, (16, 16): 4, (24, 8): 4}  # another common divisor


def make(kind: str, n: int, m: int, bias: bool = True, **kw: object) -> StructuredLinear:
    """A small layer of each kind: rank 4 (LowRank), rank 4 in 2 blocks, 2 shuffle blocks."""
    if kind == "lowrank":
        return LowRank(n, m, 4, bias=bias, dtype=F64, **kw)
    if kind == "blockdense":
        return BlockDense(n, m, 4, 2, bias=bias, dtype=F64, **kw)
    return BlockShuffle(n, m, 2, bias=bias, dtype=F64, **kw)


KINDS = ["lowrank", "blockdense", "blockshuffle"]


def anisotropic(n: int, features: int, low: float = -2.0, high: float = 1.0) -> torch.Tensor:
    """``[n, features]`` inputs, correlated, channel scales spread from 10^low to 10^high."""
    mix = torch.randn(features, features, dtype=F64) / features**0.5 + torch.eye(features)
    return (
        torch.randn(n, features, dtype=F64) @ mix * torch.logspace(low, high, features, dtype=F64)
    )


# ---------------------------------------------------------------------------- sizes and forward


@pytest.mark.parametrize(("n", "m"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_and_flop_formulas(n: int, m: int, bias: bool) -> None:
    d, b, k = min(n, m), m if bias else 0, MORE_BLOCKS[n, m]
    layers = {
        4 * (n + m): LowRank(n, m, 4, bias=bias),
        4 * (m + n // 2): BlockDense(n, m, 4, 2, bias=bias),
        4 * k * (m + n // k): BlockDense(n, m, 4 * k, k, bias=bias),
        d * (n + m) // 2: BlockShuffle(n, m, 2, bias=bias),
        d * (n + m) // k: BlockShuffle(n, m, k, bias=bias),
    }
    for weights, layer in layers.items():
        assert layer.weight_parameters() == weights
        assert layer.num_parameters() == weights + b == sum(p.numel() for p in layer.parameters())
        assert layer.flops_per_token() == 2 * weights + b
        assert layer.flops_per_token(merged=True) == 2 * n * m + b


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "m"), SHAPES)
def test_forward_is_the_dense_product(kind: str, n: int, m: int) -> None:
    layer = make(kind, n, m)
    x = torch.randn(2, 3, n, dtype=F64)
    out = layer(x)
    assert out.shape == (2, 3, m)
    torch.testing.assert_close(out, x @ layer.dense_weight().t() + layer.bias)


def test_dense_weights_from_the_factors() -> None:
    lr, bd, bs = make("lowrank", 12, 18), make("blockdense", 12, 18), make("blockshuffle", 12, 18)
    torch.testing.assert_close(lr.dense_weight(), lr.u.weight @ lr.v.weight)
    bd_v, bd_u = bd.v.stacked_weight(), bd.u.weight
    torch.testing.assert_close(bd.dense_weight(), bd_u @ block_diag_dense(bd_v))
    assert bd_v.shape == (2, 2, 6) and bd_u.shape == (18, 4)
    w1, w2 = bs.w1.stacked_weight(), bs.w2.stacked_weight()
    assert w1.shape == (2, 6, 6) and w2.shape == (2, 9, 6)
    # the shuffle of the reference code: y = f⁻¹(W2 f(W1 x)) computed by hand for one x
    x = torch.randn(12, dtype=F64)
    h = torch.cat([w1[k] @ x[6 * k : 6 * k + 6] for k in range(2)])  # [12]
    z = torch.cat([h[j::2] for j in range(2)])  # block j: every 2nd feature from j
    o = torch.cat([w2[j] @ z[6 * j : 6 * j + 6] for j in range(2)])  # [18]
    y = torch.stack([o[j * 9 + i] for i in range(9) for j in range(2)])  # y[2i + j] = o[9j + i]
    torch.testing.assert_close(bs.factored(x), y)
    torch.testing.assert_close(blockshuffle_dense(w1, w2) @ x, y)


def test_gradients_reach_the_factors() -> None:
    layer = BlockShuffle(12, 8, 2)
    layer(torch.randn(5, 12)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"^BlockDense: blocks=3 must divide in_features=16"):
        BlockDense(16, 16, 6, 3)
    with pytest.raises(ValueError, match=r"^BlockShuffle: blocks=3 must divide in_features=12 and"):
        BlockShuffle(12, 16, 3)
    with pytest.raises(ValueError, match=r"^rank must be a positive integer, got 0$"):
        LowRank(12, 16, 0)


# ---------------------------------------------------------------------------- fits


def structured_weight(kind: str, n: int, m: int) -> torch.Tensor:
    """A random ``[m, n]`` weight that has exactly the structure of ``make(kind, n, m)``."""
    src = make(kind, n, m)
    with torch.no_grad():
        for p in src.factors():
            p.normal_()
    return src.dense_weight().detach()


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "m"), SHAPES)
def test_fit_recovers_an_exactly_structured_weight(
    kind: str, n: int, m: int, calibrated: bool
) -> None:
    w = structured_weight(kind, n, m)
    x = anisotropic(64, n) if calibrated else None
    layer = make(kind, n, m)
    bias = torch.randn(m, dtype=F64)
    err = layer.init_from_dense(w, bias, x, iters=2)  # the first fit is exact; the rounds keep it
    assert err < 1e-4
    torch.testing.assert_close(layer.dense_weight(), w, rtol=0, atol=1e-6 * float(w.abs().max()))
    torch.testing.assert_close(layer.bias, bias, rtol=0, atol=0)


def test_activation_aware_lowrank_beats_plain_svd_on_outputs() -> None:
    n, m, rank = 24, 20, 4
    w, x = torch.randn(m, n, dtype=F64), anisotropic(256, n)
    plain, aware = LowRank(n, m, rank, dtype=F64), LowRank(n, m, rank, dtype=F64)
    plain.init_from_dense(w)
    aware_err = aware.init_from_dense(w, x=x)

    def out_err(layer: LowRank) -> float:
        return float((x @ (layer.dense_weight().detach() - w).t()).norm() / (x @ w.t()).norm())

    assert aware_err == pytest.approx(out_err(aware), rel=1e-9)
    assert out_err(aware) < 0.5 * out_err(plain)  # channel scales over 3 decades: a wide margin


@pytest.mark.parametrize("kind", ["blockdense", "blockshuffle"])
def test_calibrated_block_fits_beat_the_data_free_fit_on_outputs(kind: str) -> None:
    w, x = torch.randn(20, 16, dtype=F64), anisotropic(128, 16)
    free, aware = make(kind, 16, 20), make(kind, 16, 20)
    free.init_from_dense(w)
    aware_err = aware.init_from_dense(w, x=x, iters=3)
    free_err = float((x @ (free.dense_weight().detach() - w).t()).norm() / (x @ w.t()).norm())
    assert aware_err < free_err


def test_rank_deficient_calibration_is_damped() -> None:
    # 5 tokens for 24 features, one dead channel: XᵀX/n is singular without the damping
    x = anisotropic(5, 24)
    x[:, 3] = 0
    w = torch.randn(20, 24, dtype=F64)
    for kind in KINDS:
        layer = make(kind, 24, 20)
        err = layer.init_from_dense(w, x=x, iters=2)
        assert 0 <= err < 1 and torch.isfinite(layer.dense_weight()).all()


def test_fit_into_a_bf16_layer() -> None:
    w = torch.randn(16, 12)
    layer = BlockShuffle(12, 16, 2, dtype=torch.bfloat16)
    err = layer.init_from_dense(w, x=torch.randn(32, 12))
    assert layer.w1.linears[0].weight.dtype == torch.bfloat16 and err < 1.0


def test_fit_error_messages() -> None:
    layer = LowRank(12, 16, 4)
    with pytest.raises(ValueError) as err:
        layer.init_from_dense(torch.zeros(12, 16))
    assert str(err.value) == "weight must be [out, in] = [16, 12], got [12, 16]"
    with pytest.raises(ValueError) as err:
        layer.init_from_dense(torch.zeros(16, 12), x=torch.zeros(3, 11))
    assert str(err.value) == "x must be [..., 12], got [3, 11]"
    with pytest.raises(ValueError) as err:
        LowRank(12, 16, 4, bias=False).init_from_dense(torch.zeros(16, 12), torch.zeros(16))
    assert str(err.value) == "bias [16] does not fit a layer with no bias"


def test_from_a_dense_linear() -> None:
    dense = nn.Linear(16, 12, dtype=F64)
    layer = BlockDense(16, 12, 16, 2, dtype=F64)  # rank 16 >= min(in, out): exact
    assert layer.init_from_dense(dense.weight, dense.bias) < 1e-10
    x = torch.randn(4, 16, dtype=F64)
    torch.testing.assert_close(layer(x), dense(x))
