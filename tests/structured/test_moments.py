"""Input second moments from hooks, and fits from a moment equal to fits from the inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tersa.structured.fit_math import moment_output_error, output_error
from tersa.structured.layers import BlockDense, BlockShuffle, LowRank
from tersa.structured.moments import observe_moments

F64 = torch.float64


class Shared(nn.Module):
    """Two linears reading the same tensor (gate/up), a third reading their product (down)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) * self.b(x))


def test_moments_are_exact_over_every_call() -> None:
    net = Shared()
    xs = [torch.randn(2, 7, 6), torch.randn(3, 1, 6)]  # 14 + 3 tokens
    with observe_moments({"a": net.a, "b": net.b, "c": net.c}) as sums, torch.no_grad():
        hidden = [net.a(x) * net.b(x) for x in xs]
        for x in xs:
            net(x)
    flat = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    torch.testing.assert_close(sums["a"].moment(), flat.t() @ flat / 17)
    torch.testing.assert_close(sums["b"].moment(), sums["a"].moment())
    h = torch.cat([t.reshape(-1, 5) for t in hidden]).double()
    torch.testing.assert_close(sums["c"].moment(), h.t() @ h / 17, rtol=1e-5, atol=1e-6)
    assert not net.a._forward_pre_hooks  # hooks removed


def test_subsampling_keeps_a_share_of_each_call() -> None:
    lin = nn.Linear(4, 2)
    with observe_moments({"l": lin}, keep=0.25, seed=3) as sums, torch.no_grad():
        lin(torch.randn(40, 4))
        lin(torch.randn(9, 4))
    assert sums["l"].count == 10 + 3  # ceil(0.25 · n) per call


def test_no_tokens_is_an_error() -> None:
    with observe_moments({"l": nn.Linear(4, 2)}) as sums:
        pass
    with pytest.raises(ValueError, match=r"^no calibration tokens reached this layer$"):
        sums["l"].moment()


@pytest.mark.parametrize(
    "make",
    [lambda: LowRank(16, 12, 4, dtype=F64), lambda: BlockDense(16, 12, 4, 2, dtype=F64),
     lambda: BlockShuffle(16, 12, 2, dtype=F64)],
    ids=["lowrank", "blockdense", "blockshuffle"],
)  # fmt: skip
def test_fit_from_the_moment_is_the_fit_from_the_inputs(make) -> None:
    w = torch.randn(12, 16, dtype=F64)
    x = torch.randn(200, 16, dtype=F64) * torch.logspace(-1, 1, 16, dtype=F64)
    from_x, from_c = make(), make()
    err_x = from_x.init_from_dense(w, x=x, iters=2)
    err_c = from_c.init_from_moment(w, None, x.t() @ x / 200, iters=2)
    torch.testing.assert_close(from_c.dense_weight(), from_x.dense_weight())
    assert err_c == pytest.approx(err_x, rel=1e-6) and 0 < err_c < 1


def test_moment_error_is_the_output_error() -> None:
    w, f = torch.randn(5, 8, dtype=F64), torch.randn(5, 8, dtype=F64)
    x = torch.randn(30, 8, dtype=F64)
    expected = output_error(w, f, x)
    assert moment_output_error(w, f, x.t() @ x / 30) == pytest.approx(expected, rel=1e-10)


def test_moment_shape_is_checked() -> None:
    with pytest.raises(ValueError) as err:
        LowRank(16, 12, 4).init_from_moment(torch.zeros(12, 16), None, torch.eye(12))
    assert str(err.value) == "moment must be [in, in] = [16, 16], got [12, 12]"
