"""Factors as linear modules: quantization finds them, the layer runs on quantized factors, and
pre-merge steps aside once they are quantized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import find_linears, replace_linear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.structured.block_math import block_diag_dense
from tersa.structured.factors import BlockDiagonal, factor_weight
from tersa.structured.layers import BlockDense, BlockShuffle, LowRank

W8 = WeightScheme(bits=8, granularity="channel", symmetric=True)
A8 = ActivationScheme(bits=8, granularity="token", symmetric=True)


def quantize_factors(layer: nn.Module) -> None:
    for name, linear in find_linears(layer).items():
        replace_linear(layer, name, QuantLinear.from_float(linear, W8, A8))


def test_block_diagonal_is_the_block_product() -> None:
    bd = BlockDiagonal(3, 12, 9, dtype=torch.float64)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    w = bd.stacked_weight()
    assert w.shape == (3, 3, 4)
    torch.testing.assert_close(bd(x), x @ block_diag_dense(w).t())


@pytest.mark.parametrize(
    ("layer", "names"),
    [
        (LowRank(12, 18, 4), ["v", "u"]),
        (BlockDense(12, 18, 4, 2), ["v.linears.0", "v.linears.1", "u"]),
        (BlockShuffle(12, 18, 3), [f"w{k}.linears.{b}" for k in (1, 2) for b in range(3)]),
    ],
    ids=["lowrank", "blockdense", "blockshuffle"],
)
def test_quantization_finds_and_replaces_every_factor(layer: nn.Module, names: list[str]) -> None:
    assert list(find_linears(layer)) == names
    x = torch.randn(7, 12)
    with torch.no_grad():
        ref = layer(x)
    quantize_factors(layer)
    assert layer.quantized and all(isinstance(m, QuantLinear) for m in layer.factor_linears())
    with torch.no_grad():
        out = layer(x)
        # the dense product of the dequantized factors, applied without activation rounding
        approx = x @ layer.dense_weight().t() + layer.bias
    assert float((out - ref).norm() / ref.norm()) < 0.02
    assert float((approx - ref).norm() / ref.norm()) < 0.02


def test_pre_merge_is_off_for_quantized_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = LowRank(12, 18, 4, merge_below=100)
    calls = [0]
    original = layer.factored

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(x)

    monkeypatch.setattr(layer, "factored", counted)
    layer(torch.randn(2, 12))
    assert calls[0] == 0  # float factors, 2 tokens < 100: merged
    quantize_factors(layer)
    layer(torch.randn(2, 12))
    assert calls[0] == 1  # quantized: a merged float copy would undo the compression


def test_fitting_quantized_factors_is_refused() -> None:
    layer = LowRank(12, 18, 4)
    quantize_factors(layer)
    with pytest.raises(ValueError) as err:
        layer.init_from_dense(torch.randn(18, 12))
    assert str(err.value) == "cannot fit a structured layer whose factors are quantized"


def test_factor_weight_rejects_other_modules() -> None:
    with pytest.raises(TypeError) as err:
        factor_weight(nn.ReLU())
    assert str(err.value) == "a structured factor must be a linear layer, got ReLU"
