"""L2TrainLinear → L2Linear: the hardened layer computes what training last saw, stores the
narrowest code dtype, handles GPT-2's Conv1D, and caches its decoded weight correctly; holding
the rate by scaling e and Δ."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tersa.compress.l2.edgescale import target_init
from tersa.compress.l2.layer import L2Linear, L2TrainLinear
from tersa.compress.l2.train import block_entropy, hold_rate


def trained(linear: nn.Module, edge: float = 0.02, step: float = 0.03) -> L2TrainLinear:
    return L2TrainLinear(linear, edge, step)


def test_hardened_layer_matches_the_training_forward() -> None:
    linear = nn.Linear(123, 5)
    layer = trained(linear)
    x = torch.randn(7, 123)
    hard = layer.harden()
    assert isinstance(hard, L2Linear) and hard.weight_codes.dtype == torch.int8
    assert hard.weight_codes.shape == (5, 123)
    with torch.no_grad():
        torch.testing.assert_close(hard(x), layer(x), rtol=0, atol=1e-6)
    assert hard.entropy() == layer.entropy()
    assert 0 < hard.prune_fraction() < 1
    assert not any(p.requires_grad for p in hard.parameters())


def test_conv1d_weights_are_transposed_and_a_tiny_step_widens_the_codes() -> None:
    conv = Conv1D(6, 10)  # GPT-2 style: weight [in, out]
    nn.init.normal_(conv.weight, std=0.5)
    layer = trained(conv, edge=1e-4, step=1e-4).harden()
    assert layer.weight_codes.shape == (6, 10) and layer.weight_codes.dtype == torch.int16
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-3)


def test_bf16_harden_takes_codes_against_the_rounded_e_and_step() -> None:
    linear = nn.Linear(64, 16).to(torch.bfloat16)
    layer = trained(linear, edge=0.0123, step=0.0321)
    hard = layer.harden()
    assert hard.edge.dtype == torch.bfloat16 and hard.bias.dtype == torch.bfloat16
    k = hard.weight_codes.float()
    w = hard.decoded_weight(torch.float32)
    e, d = hard.edge.float(), hard.step.float()
    torch.testing.assert_close(w[k != 0].abs(), e + (k[k != 0].abs() - 0.5) * d)


def test_decoded_weight_is_cached_until_a_buffer_changes() -> None:
    layer = trained(nn.Linear(8, 6)).harden()
    first = layer.decoded_weight()
    assert layer.decoded_weight() is first
    with torch.no_grad():
        layer.weight_codes.zero_()
    assert layer.decoded_weight().eq(0).all()
    layer.to(torch.float64)
    assert layer.decoded_weight().dtype == torch.float64


def test_hold_rate_scales_e_and_step_toward_the_target() -> None:
    linear = nn.Linear(300, 200)
    nn.init.normal_(linear.weight, std=0.05)
    edge, step = target_init(linear.weight, 4.0)
    layers = {"a": L2TrainLinear(linear, edge, step)}
    bits = block_entropy(layers)
    assert bits == pytest.approx(4.0, abs=0.03)
    hold_rate(layers, 3.0, bits)  # one doubling of e and Δ: about one bit fewer
    assert layers["a"].step.item() == pytest.approx(2 * step, rel=0.02)
    assert block_entropy(layers) == pytest.approx(3.0, abs=0.1)
    assert block_entropy(layers, stride=8) == pytest.approx(block_entropy(layers), abs=0.05)
