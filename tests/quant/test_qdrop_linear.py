"""QDropLinear: AdaRound weights, LSQ / per-token inputs, the QDrop mask, hardening."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tersa.quant.adaround import beta_schedule, hard_rounding, rounding_regularizer
from tersa.quant.primitives import fake_quantize_per_token, quantize_weight
from tersa.quant.qdrop_linear import QDropLinear, lsq_fake_quantize
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import ActivationScheme, WeightScheme

W4G = WeightScheme(bits=4, granularity="group", group_size=16)
A8T = ActivationScheme(bits=8, granularity="token")
A6S = ActivationScheme(bits=6, granularity="tensor", symmetric=False)


def _linear(out_f: int = 24, in_f: int = 40, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def _fit_weight(layer: QDropLinear, target: torch.Tensor, iters: int, lam: float) -> None:
    """Adam on V for ``‖Ŵ − W‖²`` (+ λ·regulariser with β annealed 20 → 2, no warm-up)."""
    opt = torch.optim.Adam([layer.rounding], lr=0.05)
    for step in range(iters):
        loss = (layer.soft_weight() - target).pow(2).sum()
        beta = beta_schedule(step, iters, 0.0, 20.0, 2.0)
        if lam > 0:
            loss = loss + lam * rounding_regularizer(layer.rounding, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _agreement_with_nearest(layer: QDropLinear, w: torch.Tensor) -> float:
    rtn = quantize_weight(w, W4G)  # nearest rounding on the same (min-max) grid
    hard = layer.harden()
    return (hard._codes() == rtn.codes).float().mean().item()


def test_soft_rounding_converges_to_nearest_without_regulariser() -> None:
    lin = _linear()
    w = lin.weight.detach()
    agreement = []
    for iters in (0, 25, 300):
        layer = QDropLinear(lin, W4G, None, observer="minmax")
        with torch.no_grad():  # start far from the answer: random rounding choices
            layer.rounding.copy_(torch.randn_like(layer.rounding))
        _fit_weight(layer, w, iters, lam=0.0)
        agreement.append(_agreement_with_nearest(layer, w))
    assert agreement[0] < 0.75
    assert agreement[0] < agreement[1] < agreement[2]
    assert agreement[2] > 0.99


def test_hardening_reproduces_the_soft_weight_at_the_end_of_annealing() -> None:
    lin = _linear(seed=1)
    layer = QDropLinear(lin, W4G, None, observer="minmax")
    _fit_weight(layer, lin.weight.detach() * 1.03, 400, lam=0.05)
    h = torch.sigmoid(layer.rounding) * 1.2 - 0.1
    undecided = ((h > 0.01) & (h < 0.99)).float().mean().item()
    assert undecided < 0.01
    soft, hard = layer.soft_weight().detach(), layer.soft_weight(hard=True).detach()
    assert (soft - hard).norm() / hard.norm() < 1e-3


def test_drop_mask_keeps_quantized_values_at_the_requested_rate() -> None:
    torch.manual_seed(0)
    lin = _linear(in_f=64)
    x = torch.randn(64, 64, 64)
    q = fake_quantize_per_token(x, 4, True)
    differs = q != x
    for keep in (0.0, 0.25, 0.5, 1.0):
        layer = QDropLinear(lin, None, ActivationScheme(bits=4, granularity="token"), keep)
        layer.dropping = True
        mixed = layer._quantize_input(x)
        assert torch.equal(mixed[~differs], x[~differs])
        rate = (mixed[differs] == q[differs]).float().mean().item()
        assert rate == pytest.approx(keep, abs=0.01)
        assert torch.equal((mixed == q) | (mixed == x), torch.ones_like(x, dtype=torch.bool))
    layer.dropping = False  # outside reconstruction every element is quantized
    assert torch.equal(layer._quantize_input(x), q)


def test_lsq_step_gets_a_scaled_gradient_and_inputs_pass_straight_through() -> None:
    x = torch.linspace(-2, 2, 101, requires_grad=True)
    step = torch.tensor(0.05, requires_grad=True)
    y = lsq_fake_quantize(x, step, None, 6)  # range ±31·0.05 = ±1.55: the ends clip
    y.sum().backward()
    inside = x.detach().abs() < 1.5
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert step.grad is not None and torch.isfinite(step.grad) and step.grad != 0
    torch.testing.assert_close(y.detach(), torch.clamp(torch.round(x / 0.05), -32, 31) * 0.05)


@pytest.mark.parametrize("acts", [A8T, A6S, None])
def test_harden_gives_a_quantlinear_with_the_same_output(acts: ActivationScheme | None) -> None:
    lin = _linear(seed=2)
    layer = QDropLinear(lin, W4G, acts, drop_prob=0.5)
    torch.manual_seed(3)
    with torch.no_grad():
        layer.rounding.add_(torch.randn_like(layer.rounding))
    x = torch.randn(5, 7, 40)
    if acts is not None and acts.granularity == "tensor":
        layer.start_observing()
        layer(x)
        layer.init_input_step()
        with torch.no_grad():
            layer.input_step.mul_(0.8)  # as if LSQ had moved it
    ql = layer.harden()
    assert isinstance(ql, QuantLinear)
    with torch.no_grad():
        layer.rounding.copy_(hard_rounding(layer.rounding) * 40 - 20)  # h(V) exactly 0 or 1
        torch.testing.assert_close(ql(x), layer(x), rtol=1e-5, atol=1e-5)
    if acts is not None and acts.granularity == "tensor":
        assert ql.input_scale.item() == pytest.approx(layer.input_step.item())


def test_static_input_needs_a_step_before_running() -> None:
    layer = QDropLinear(_linear(), None, A6S)
    with pytest.raises(RuntimeError, match="init_input_step"):
        layer(torch.randn(2, 40))
