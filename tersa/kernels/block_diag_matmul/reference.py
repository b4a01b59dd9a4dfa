"""Block-diagonal matmul in pure torch: the spec of the Triton kernel, its test oracle and the CPU path.

A block-diagonal weight ``diag(w[0], ..., w[nb-1])`` (``w [nb, bo, bi]``) maps ``x [..., nb*bi]`` to
``[..., nb*bo]``: input block ``b`` (features ``b*bi .. b*bi+bi-1``) feeds only output block ``b``.
It is the first factor of the BlockDense and both factors of the BlockShuffle layers
(:mod:`tersa.structured.layers`).
"""

from __future__ import annotations

import torch


def check_block_diag_args(x: torch.Tensor, w: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first argument whose shape or dtype does not fit."""
    if x.dim() < 1 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a float tensor [..., nb*bi], got {x.dtype} {tuple(x.shape)}")
    if w.dim() != 3 or not w.dtype.is_floating_point:
        raise ValueError(f"w must be a float tensor [nb, bo, bi], got {w.dtype} {tuple(w.shape)}")
    nb, _, bi = w.shape
    if x.shape[-1] != nb * bi:
        raise ValueError(
            f"x has {x.shape[-1]} features but w {tuple(w.shape)} needs nb*bi = {nb * bi}"
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 ``x``, else float32: 16-bit inputs are summed in fp32, as on the GPU."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def block_diag_matmul_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y[..., b*bo + o] = sum_i x[..., b*bi + i] * w[b, o, i]``: ``x [..., nb*bi]`` -> ``[..., nb*bo]``.

    One batched GEMM over the blocks, in float32 (float64 for float64 ``x``); the result has ``x``'s
    dtype. Differentiable (plain torch ops), so it is also the training path.
    """
    check_block_diag_args(x, w)
    nb, bo, bi = w.shape
    dt = compute_dtype(x)
    xb = x.reshape(-1, nb, bi).transpose(0, 1).to(dt)  # [nb, M, bi]
    out = torch.bmm(xb, w.to(dt).transpose(1, 2))  # [nb, M, bo]
    return out.transpose(0, 1).reshape(*x.shape[:-1], nb * bo).to(x.dtype)
