"""EdgeScale math: the grid, exact round trips of grid points, pruning at |w| ≤ |e|, the
straight-through gradients, code dtypes and the two initialisations."""

from __future__ import annotations

import pytest
import torch

from tersa.compress.l2.edgescale import (
    code_dtype,
    decode,
    encode,
    fake_quantize,
    integer_codes,
    paper_init,
    round_ste,
    target_init,
)
from tersa.compress.l2.rate import empirical_entropy

E, D = torch.tensor(0.03), torch.tensor(0.02)


def weights(*shape: int, scale: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * scale


@pytest.mark.parametrize("shape", [(5, 123), (1, 63), (64, 64)])
def test_decoded_weights_lie_on_the_grid(shape: tuple[int, int]) -> None:
    w_hat = decode(torch.round(encode(weights(*shape), E, D)), E, D)
    kept = w_hat != 0
    k = (w_hat[kept].abs() - E) / D + 0.5  # |ŵ| = e + (k − ½)Δ
    assert kept.any() and (~kept).any()
    assert torch.allclose(k, torch.round(k), atol=1e-4)
    assert (torch.round(k) >= 1).all()


def test_codes_of_grid_points_round_trip() -> None:
    codes = torch.arange(-40, 41, dtype=torch.float32)
    for edge, step in ((E, D), (torch.tensor(0.5), torch.tensor(0.25)), (-E, -D)):
        grid = decode(codes, edge, step)
        assert torch.equal(torch.round(encode(grid, edge, step)), codes)
        assert torch.equal(integer_codes(grid, edge, step), codes.to(torch.int8))
        assert torch.equal(decode(integer_codes(grid, edge, step).float(), edge, step), grid)


def test_weights_within_the_edge_are_pruned() -> None:
    w = torch.tensor([-0.03, -0.0299, -0.01, 0.0, 0.01, 0.03, 0.0301, -0.0301])
    codes = integer_codes(w, E, D)
    assert codes.tolist() == [0, 0, 0, 0, 0, 0, 1, -1]
    assert decode(codes.float(), E, D)[:6].eq(0).all()
    c = encode(w, E, D)
    assert (c[:6].abs() <= 0.5).all() and (c[6:].abs() > 0.5).all()
    # a wider edge prunes more, the same step keeps the grid beyond it uniform
    assert (integer_codes(weights(50, 50), 2 * E, D) == 0).sum() > (
        integer_codes(weights(50, 50), E, D) == 0
    ).sum()


def test_straight_through_gradients_reach_e_and_step() -> None:
    w = weights(37, 53).double()
    g = torch.randn(37, 53, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for f in (fake_quantize, lambda w, e, d: decode(round_ste(encode(w, e, d)), e, d)):
        leaves = [
            w.clone().requires_grad_(),
            E.double().requires_grad_(),
            D.double().requires_grad_(),
        ]
        out = f(*leaves)
        (out * g).sum().backward()
        grads.append([out.detach(), *(t.grad for t in leaves)])
    for fast, reference in zip(*grads, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)
    _, gw, ge, gd = grads[0]
    assert torch.equal(gw, g)  # ∂ŵ/∂w = 1
    assert ge.abs() > 0 and gd.abs() > 0


def test_code_dtype_is_the_narrowest_that_fits() -> None:
    assert [code_dtype(n) for n in (0, 127, 128, 32767, 32768)] == [
        torch.int8,
        torch.int8,
        torch.int16,
        torch.int16,
        torch.int32,
    ]
    assert integer_codes(torch.tensor([1.0, -1.0]), E, torch.tensor(1e-3)).dtype == torch.int16


@pytest.mark.parametrize("bits", [1.5, 3.2, 5.0])
def test_target_init_reaches_the_entropy(bits: float) -> None:
    w = weights(256, 300)
    edge, step = target_init(w, bits)
    assert edge == pytest.approx(step / 2)  # the uniform quantizer
    got = empirical_entropy(integer_codes(w, torch.tensor(edge), torch.tensor(step)))
    assert got == pytest.approx(bits, abs=0.03)  # bisected on a 65,536-weight subset


def test_inits_of_a_constant_tensor_and_the_paper() -> None:
    assert target_init(torch.zeros(8, 8), 3.0) == (0.5, 1.0)
    assert paper_init(torch.zeros(8, 8)) == (1.0, 1.0)
    w = torch.tensor([[-1.0, 0.5], [3.0, 0.0]])
    assert paper_init(w) == (4.0 / 256, 4.0 / 256)
