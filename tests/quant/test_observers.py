"""The MSE weight observer: never worse than min-max, per row or per group (short last group)."""

from __future__ import annotations

import pytest
import torch

from tersa.quant.observers import group_sum, mse_weight_qparams
from tersa.quant.primitives import (
    dequantize,
    expand_groups,
    quantize,
    scale_shape,
    weight_qparams,
)
from tersa.quant.scheme import WeightScheme


def _row_errors(w: torch.Tensor, scheme: WeightScheme, scale, zp) -> torch.Tensor:
    g = scheme.group_size if scheme.granularity == "group" else None
    s = expand_groups(scale, g, w.shape[1])
    z = None if scheme.symmetric else expand_groups(zp, g, w.shape[1])
    err = (dequantize(quantize(w, s, z, scheme.bits), s, z) - w).pow(2)
    return err.sum().reshape(1, 1) if scheme.granularity == "tensor" else group_sum(err, g)


@pytest.mark.parametrize(
    "scheme",
    [
        WeightScheme(bits=4, granularity="channel"),
        WeightScheme(bits=3, granularity="group", group_size=16, symmetric=False),
        WeightScheme(bits=4, granularity="tensor"),
    ],
)
def test_mse_observer_is_never_worse_than_minmax_and_usually_better(scheme: WeightScheme) -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 40) * torch.rand(32, 1)  # 40 inputs: the last group of 16 has 8
    w[:, 3] *= 6  # a few large weights: min-max wastes range on them
    s_mse, z_mse = mse_weight_qparams(w, scheme)
    s_mm, z_mm = weight_qparams(w, scheme)
    assert s_mse.shape == s_mm.shape == scale_shape(32, 40, scheme)
    e_mse, e_mm = _row_errors(w, scheme, s_mse, z_mse), _row_errors(w, scheme, s_mm, z_mm)
    assert (e_mse <= e_mm * (1 + 1e-6)).all()
    assert e_mse.sum() < 0.95 * e_mm.sum()


def test_group_sum_handles_a_short_last_group() -> None:
    err = torch.arange(20.0).reshape(2, 10)
    assert group_sum(err, 4).tolist() == [[6.0, 22.0, 17.0], [46.0, 62.0, 37.0]]
    assert group_sum(err, None).tolist() == [[45.0], [145.0]]
