"""Fitting the block-diagonal factors of BlockDense and BlockShuffle to a dense weight.

Both products are ``W' = A · diag(V_1, ..., V_B)`` for some left matrix ``A`` (BlockDense: the dense
``U``; BlockShuffle: the second factor with its shuffles). The objective is
``tr((W - W') C (W - W')ᵀ)`` (``C`` the damped second moment of the calibration inputs, None for
the identity; see :mod:`tersa.structured.fit_math`). Without calibration data both have
closed-form optima (per-block SVDs); with it, alternating least squares refines them, every step
an exact minimisation over one factor or one block, so the error never increases.

Pure float64 tensor functions; blocks are ``[B, rows, cols]`` as in
:func:`tersa.kernels.block_diag_matmul.block_diag_matmul`.
"""

from __future__ import annotations

import torch

from tersa.structured.fit_math import fit_left, left_solve, lowrank_factors, right_solve


def block_diag_dense(blocks: torch.Tensor) -> torch.Tensor:
    """The full ``[B*r, B*c]`` matrix of ``blocks [B, r, c]``."""
    return torch.block_diag(*blocks.unbind(0))


def _sub(c: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    return None if c is None else c[rows, cols]


def fit_block_diag(
    w: torch.Tensor, a: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None
) -> torch.Tensor:
    """One sweep of exact per-block updates of ``v [B, q, p]`` in ``W ≈ A · diag(v)``.

    ``w [M, B*p]``, ``a [M, B*q]``. Block ``k`` (columns ``K`` of ``W``, columns ``Q`` of ``A``)
    with the others fixed solves ``A_Qᵀ A_Q V_k C_KK = A_Qᵀ E C_:K``, ``E`` the weight minus the
    other blocks' part: ``V_k = (A_QᵀA_Q)⁻¹ A_Qᵀ (R C_:K + A_Q V_k C_KK) C_KK⁻¹`` with the current
    residual ``R``. Without ``C`` the blocks decouple and one sweep is the optimum.
    """
    nb, q, p = v.shape
    v = v.clone()
    res = w - a @ block_diag_dense(v)  # [M, N]
    for k in range(nb):
        cols, qs = slice(k * p, (k + 1) * p), slice(k * q, (k + 1) * q)
        a_k = a[:, qs]  # [M, q]
        if c is None:
            g = res[:, cols] + a_k @ v[k]  # [M, p]: this block's target
            new = left_solve(a_k.t() @ a_k, a_k.t() @ g)
        else:
            c_kk = c[cols, cols]
            g = res @ c[:, cols] + a_k @ v[k] @ c_kk  # [M, p] = E C_:K
            new = right_solve(left_solve(a_k.t() @ a_k, a_k.t() @ g), c_kk)
        res[:, cols] += a_k @ (v[k] - new)
        v[k] = new
    return v


# ---------------------------------------------------------------------------------- BlockDense


def blockdense_init(
    w: torch.Tensor, rank: int, blocks: int, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U [M, R]``, ``V [B, R/B, N/B]``: per-block (weighted) SVDs, then the best ``U``.

    Block ``k`` of ``V`` spans the top ``R/B`` (``C_kk``-weighted) right singular directions of
    ``W``'s column block ``k``. Without ``C`` the column blocks of ``W`` are fitted independently
    by ``U_k V_k``, so this is the optimum.
    """
    p, q = w.shape[1] // blocks, rank // blocks
    vs = []
    for k in range(blocks):
        cols = slice(k * p, (k + 1) * p)
        vs.append(lowrank_factors(w[:, cols], q, _sub(c, cols, cols))[1])  # [q, p]
    v = torch.stack(vs)
    return fit_left(w, block_diag_dense(v), c), v


def blockdense_fit(
    w: torch.Tensor, rank: int, blocks: int, c: torch.Tensor | None, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`blockdense_init`, then ``iters`` rounds of (all ``V`` blocks, ``U``) updates."""
    w = w.to(torch.float64)
    u, v = blockdense_init(w, rank, blocks, c)
    for _ in range(iters if c is not None else 0):
        v = fit_block_diag(w, u, v, c)
        u = fit_left(w, block_diag_dense(v), c)
    return u, v


# -------------------------------------------------------------------------------- BlockShuffle


def stride_permutation(n: int, blocks: int) -> torch.Tensor:
    """``perm [n]`` with ``z = h[perm]`` regrouping ``h`` by stride: ``z[j*(n/B) + i] = h[i*B + j]``.

    The mid shuffle of BlockShuffle: block ``j`` of ``z`` gathers features ``j, j+B, j+2B, ...`` of
    ``h``, so each second-stage block mixes the outputs of every first-stage block (``D/B >= B``).
    """
    return torch.arange(n).view(n // blocks, blocks).t().reshape(-1)


def unstride_permutation(n: int, blocks: int) -> torch.Tensor:
    """The inverse of :func:`stride_permutation`: ``y = o[perm]`` gives ``y[i*B + j] = o[j*(n/B) + i]``."""
    return torch.arange(n).view(blocks, n // blocks).t().reshape(-1)


def blockshuffle_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``[M, N]`` weight of BlockShuffle ``w1 [B, D/B, N/B]``, ``w2 [B, M/B, D/B]``.

    ``W = P_out · diag(w2) · P_mid · diag(w1)``, the permutations as rows of the identity.
    """
    nb, d, m = w1.shape[0], w1.shape[0] * w1.shape[1], w2.shape[0] * w2.shape[1]
    mid, out = stride_permutation(d, nb), unstride_permutation(m, nb)
    return block_diag_dense(w2)[out] @ block_diag_dense(w1)[mid]


def _pair_index(d: int, blocks: int, ll: int, kk: int) -> torch.Tensor:
    """Second-stage inputs ``rr`` of block ``ll`` that come from first-stage block ``kk``."""
    rr = torch.arange(d // blocks)
    return rr[(rr * blocks + ll) // (d // blocks) == kk]


def blockshuffle_project(w: torch.Tensor, blocks: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Frobenius-nearest BlockShuffle ``w1 [B, D/B, N/B]``, ``w2 [B, M/B, D/B]`` to ``w [M, N]``.

    After undoing the output permutation, the ``[M/B, N/B]`` tile ``(ll, kk)`` of ``W`` is
    ``sum`` over the mid features ``j = rr·B + ll`` in first-stage block ``kk`` of
    ``w2[ll][:, rr] ⊗ w1[kk][j - kk·D/B, :]``. Every column of ``w2`` and row of ``w1`` belongs to
    one tile, so a truncated SVD per tile (rank = the number of such ``j``) is the optimum: the
    Monarch projection of Dao et al. (2022), for rectangular blocks.
    """
    m, n = w.shape
    q, p, s = d // blocks, n // blocks, m // blocks
    t = torch.empty_like(w)
    t[unstride_permutation(m, blocks)] = w  # rows of the block-diagonal product, before P_out
    w1 = w.new_zeros(blocks, q, p)
    w2 = w.new_zeros(blocks, s, q)
    for ll in range(blocks):
        for kk in range(blocks):
            rr = _pair_index(d, blocks, ll, kk)
            if rr.numel() == 0:
                continue
            tile = t[ll * s : (ll + 1) * s, kk * p : (kk + 1) * p]  # [s, p]
            u, v = lowrank_factors(tile, rr.numel())
            w2[ll][:, rr] = u
            w1[kk][rr * blocks + ll - kk * q] = v
    return w1, w2


def _left_matrix(w2: torch.Tensor, d: int) -> torch.Tensor:
    """``A [M, D]`` with ``W = A · diag(w1)``: ``P_out · diag(w2) · P_mid`` as a dense matrix."""
    nb, m = w2.shape[0], w2.shape[0] * w2.shape[1]
    a0 = block_diag_dense(w2)[unstride_permutation(m, nb)]  # [M, D] = P_out diag(w2)
    a = torch.empty_like(a0)
    a[:, stride_permutation(d, nb)] = a0  # right-multiplying by P_mid moves columns
    return a


def fit_second_stage(w: torch.Tensor, w1: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """The best ``w2 [B, M/B, D/B]`` for fixed ``w1``: one independent least squares per block."""
    nb, q = w1.shape[0], w1.shape[1]
    m, d = w.shape[0], nb * q
    t = torch.empty_like(w)
    t[unstride_permutation(m, nb)] = w
    z = block_diag_dense(w1)[stride_permutation(d, nb)]  # [D, N]: P_mid diag(w1)
    s = m // nb
    return torch.stack(
        [fit_left(t[ll * s : (ll + 1) * s], z[ll * q : (ll + 1) * q], c) for ll in range(nb)]
    )


def blockshuffle_fit(
    w: torch.Tensor, blocks: int, c: torch.Tensor | None, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`blockshuffle_project`, then ``iters`` rounds of (``w1`` blocks, ``w2``) updates.

    The projection is the optimum without ``C``; the rounds run only with calibration data.
    """
    w = w.to(torch.float64)
    d = min(w.shape)
    w1, w2 = blockshuffle_project(w, blocks, d)
    for _ in range(iters if c is not None else 0):
        w1 = fit_block_diag(w, _left_matrix(w2, d), w1, c)
        w2 = fit_second_stage(w, w1, c)
    return w1, w2
