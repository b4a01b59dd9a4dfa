"""Shared math of fitting a structured weight to a dense one: second moments, damped Cholesky
factors, ridge solves, the (activation-aware) truncated SVD, the output error.

Pure tensor functions (no modules, no hooks), computed in float64. A second moment ``C`` of the
calibration inputs turns the output error into a weighted weight error:
``||X Wᵀ - X W'ᵀ||² / n = tr((W - W') C (W - W')ᵀ)`` with ``C = XᵀX / n``; ``C = None`` stands for
the identity (no calibration data: the plain Frobenius error).
"""

from __future__ import annotations

import torch

# Relative jitter added to Gram matrices before a solve: only there so that an exactly singular
# Gram (a zero column of a factor) does not fail; far below any error the fits care about.
SOLVE_JITTER = 1e-12
# Damping retries: each multiplies the damping by 100 until the Cholesky succeeds.
CHOLESKY_RETRIES = 6


def second_moment(x: torch.Tensor, damp: float) -> torch.Tensor:
    """``XᵀX / n + λ·I`` (float64 ``[N, N]``) of inputs ``x [..., N]``, ``λ = damp · mean(diag)``.

    The damping keeps the moment invertible when the samples do not span every direction (fewer
    tokens than features, dead channels); relative to the mean energy so that it is scale free.
    """
    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # [n, N]
    if x2.shape[0] == 0:
        raise ValueError("calibration inputs x have no rows")
    c = x2.t() @ x2 / x2.shape[0]
    return add_ridge(c, damp)


def add_ridge(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``G + λ·I`` with ``λ = damp · mean(diag G)`` (``damp`` itself for an all-zero ``G``)."""
    scale = float(gram.diagonal().mean()) if gram.numel() else 0.0
    lam = damp * (scale if scale > 0 else 1.0)
    return gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def damped_cholesky(gram: torch.Tensor, damp: float = SOLVE_JITTER) -> torch.Tensor:
    """Lower ``L`` with ``L Lᵀ = G + λ·I`` (:func:`add_ridge`), raising ``λ`` until ``G`` factors."""
    for _ in range(CHOLESKY_RETRIES):
        chol, info = torch.linalg.cholesky_ex(add_ridge(gram, damp))
        if int(info) == 0:
            return chol
        damp = max(damp, SOLVE_JITTER) * 100.0
    raise ValueError(f"the Gram matrix {tuple(gram.shape)} is not positive semi-definite")


def right_solve(rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``rhs @ G⁻¹`` for a symmetric PSD ``G [k, k]`` and ``rhs [a, k]`` (jittered Cholesky)."""
    chol = damped_cholesky(gram)
    return torch.cholesky_solve(rhs.t(), chol).t()


def left_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``G⁻¹ @ rhs`` for a symmetric PSD ``G [k, k]`` and ``rhs [k, a]`` (jittered Cholesky)."""
    return torch.cholesky_solve(rhs, damped_cholesky(gram))


def lowrank_factors(
    w: torch.Tensor, rank: int, c: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``R`` factors ``U [M, R]``, ``V [R, N]`` of ``w [M, N]`` minimising ``tr(E C Eᵀ)``.

    ``E = W - U V``. With ``C = L Lᵀ`` the error is ``||(W - UV) L||_F``, so the truncated SVD of
    ``W L`` is optimal; ``V`` then undoes ``L`` (``V = √S Qᵀ L⁻¹``). ``C = None``: the plain
    truncated SVD. The singular values are split evenly, ``U = P√S``. A rank above
    ``min(M, N)`` gets zero rows/columns.
    """
    w = w.to(torch.float64)
    chol = None if c is None else damped_cholesky(c, 0.0)
    a = w if chol is None else w @ chol  # [M, N]
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    u = w.new_zeros(w.shape[0], rank)
    v = w.new_zeros(rank, w.shape[1])
    u[:, :k] = p[:, :k] * root
    v[:k] = root[:, None] * qh[:k]
    if chol is not None:  # V L⁻¹: solve X L = V
        v = torch.linalg.solve_triangular(chol, v, upper=False, left=False)
    return u, v


def fit_left(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """The best ``U [M, R]`` in ``W ≈ U H`` for a fixed ``h [R, N]``: ``U = W C Hᵀ (H C Hᵀ)⁻¹``."""
    hc = h if c is None else h @ c  # [R, N]
    return right_solve(w @ hc.t(), hc @ h.t())


def output_error(
    weight: torch.Tensor, fitted: torch.Tensor, x: torch.Tensor | None = None
) -> float:
    """``||X W'ᵀ - X Wᵀ|| / ||X Wᵀ||`` for ``x [..., N]``; without ``x``, ``||W' - W|| / ||W||``.

    Norms are Frobenius, in float64; ``weight`` and ``fitted`` are ``[M, N]``.
    """
    w64, f64 = weight.detach().to(torch.float64), fitted.detach().to(torch.float64)
    if x is None:
        ref, diff = w64, f64 - w64
    else:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        ref, diff = x2 @ w64.t(), x2 @ (f64 - w64).t()
    return float(diff.norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny))


def moment_output_error(weight: torch.Tensor, fitted: torch.Tensor, c: torch.Tensor) -> float:
    """:func:`output_error` from the inputs' second moment ``c = XᵀX/n`` ``[N, N]`` instead of
    the inputs: ``sqrt(tr(E C Eᵀ) / tr(W C Wᵀ))`` with ``E = W' − W`` (the same value, since
    ``||X Aᵀ||² = n·tr(A C Aᵀ)``)."""
    w64 = weight.detach().to(torch.float64)
    e64 = fitted.detach().to(torch.float64) - w64
    c64 = c.to(w64.device, torch.float64)
    num = ((e64 @ c64) * e64).sum().clamp_min(0.0)  # [M, N] ⊙ [M, N]: tr(E C Eᵀ)
    den = ((w64 @ c64) * w64).sum().clamp_min(torch.finfo(torch.float64).tiny)
    return float((num / den).sqrt())
