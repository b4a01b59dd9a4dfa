"""Block-diagonal matmul: ``x [..., nb*bi]`` times ``diag(w[0], ..., w[nb-1])ᵀ`` -> ``[..., nb*bo]``."""

from __future__ import annotations

import torch

from tersa.kernels.block_diag_matmul.reference import block_diag_matmul_reference
from tersa.kernels.dispatch import use_triton

__all__ = ["block_diag_matmul", "block_diag_matmul_reference"]


def block_diag_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y[..., b*bo + o] = sum_i x[..., b*bi + i] * w[b, o, i]``.

    :param x: activations ``[..., nb*bi]``, float.
    :param w: the diagonal blocks ``[nb, bo, bi]``, float (block ``b`` maps input features
        ``b*bi ..`` to output features ``b*bo ..``).
    :returns: ``[..., nb*bo]`` in ``x``'s dtype. CUDA tensors run the Triton kernel (fp32
        accumulation) unless autograd needs a gradient through the call (the kernel has no
        backward, so training runs :func:`block_diag_matmul_reference`, a batched torch GEMM) or
        ``x`` is float64 (the kernel computes in fp32).

    Example::

        w = torch.randn(4, 96, 128)  # 4 blocks of 128 -> 96
        y = block_diag_matmul(torch.randn(7, 512), w)  # [7, 384]
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if not needs_grad and x.dtype != torch.float64 and use_triton(x, w):
        from tersa.kernels.block_diag_matmul.triton import block_diag_matmul_triton

        return block_diag_matmul_triton(x, w)
    return block_diag_matmul_reference(x, w)
