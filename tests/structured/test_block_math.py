"""Block fits: the shuffle permutations, optimality of the closed-form fits without calibration
data (zero gradient), and monotone alternating least squares with it."""

from __future__ import annotations

from itertools import pairwise

import torch

from tersa.structured.block_math import (
    block_diag_dense,
    blockdense_fit,
    blockdense_init,
    blockshuffle_dense,
    blockshuffle_fit,
    blockshuffle_project,
    fit_block_diag,
    stride_permutation,
    unstride_permutation,
)
from tersa.structured.fit_math import second_moment

F64 = torch.float64


def weighted(w: torch.Tensor, fitted: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    e = w - fitted
    return e.square().sum() if c is None else torch.trace(e @ c @ e.t())


def moment(n: int) -> torch.Tensor:
    x = torch.randn(64, n, dtype=F64) @ (torch.eye(n, dtype=F64) + torch.randn(n, n, dtype=F64))
    return second_moment(x * torch.logspace(-1, 1, n, dtype=F64), 1e-6)


def test_permutations() -> None:
    mid, out = stride_permutation(12, 3), unstride_permutation(12, 3)
    assert mid.tolist() == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    assert torch.equal(mid[out], torch.arange(12)) and torch.equal(out[mid], torch.arange(12))


def test_blockshuffle_projection_is_a_stationary_point() -> None:
    for n, m, b in [(12, 18, 3), (18, 12, 3), (16, 16, 4), (10, 6, 2)]:
        w = torch.randn(m, n, dtype=F64)
        w1, w2 = blockshuffle_project(w, b, min(n, m))
        w1.requires_grad_()
        w2.requires_grad_()
        grads = torch.autograd.grad(weighted(w, blockshuffle_dense(w1, w2), None), (w1, w2))
        assert max(float(g.norm()) for g in grads) < 1e-9 * float(w.norm())


def test_blockdense_init_is_a_stationary_point_without_data() -> None:
    w = torch.randn(18, 12, dtype=F64)
    u, v = blockdense_init(w, 6, 3, None)
    u.requires_grad_()
    v.requires_grad_()
    grads = torch.autograd.grad(weighted(w, u @ block_diag_dense(v), None), (u, v))
    assert max(float(g.norm()) for g in grads) < 1e-9 * float(w.norm())


def test_block_diag_sweep_never_increases_the_error() -> None:
    w, a, c = torch.randn(10, 12, dtype=F64), torch.randn(10, 6, dtype=F64), moment(12)
    v = torch.randn(3, 2, 4, dtype=F64)
    errs = [float(weighted(w, a @ block_diag_dense(v), c))]
    for _ in range(4):
        v = fit_block_diag(w, a, v, c)
        errs.append(float(weighted(w, a @ block_diag_dense(v), c)))
    assert all(e1 <= e0 * (1 + 1e-12) for e0, e1 in pairwise(errs))
    assert errs[-1] < errs[0]


def test_alternating_rounds_never_increase_the_error() -> None:
    w, c = torch.randn(12, 16, dtype=F64), moment(16)
    bd, bs = [], []
    for rounds in (0, 1, 3):
        u, v = blockdense_fit(w, 8, 4, c, rounds)
        bd.append(weighted(w, u @ block_diag_dense(v), c))
        bs.append(weighted(w, blockshuffle_dense(*blockshuffle_fit(w, 4, c, rounds)), c))
    for errs in (bd, bs):
        assert all(float(e1) <= float(e0) * (1 + 1e-12) for e0, e1 in pairwise(errs))
