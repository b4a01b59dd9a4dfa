"""RAT+ decode attention: one query per sequence over the valid prefix of a compact cache."""

from __future__ import annotations

import torch

from tersa.kernels.dispatch import use_triton
from tersa.kernels.ratplus_decode.reference import ratplus_decode_reference

__all__ = ["ratplus_decode", "ratplus_decode_reference"]


def ratplus_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float | None = None
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v`` over cache entries ``[0, n)`` with grouped query heads.

    :param q: queries ``[B, Hq, d]`` (post-RoPE), float.
    :param k: keys ``[B, Hkv, N, d]`` (``Hq`` a multiple of ``Hkv``); only ``[0, n)`` is read.
    :param v: values ``[B, Hkv, N, d]``.
    :param n: valid entries, ``1 <= n <= N``.
    :param scale: softmax scale, ``d ** -0.5`` when None.
    :returns: ``[B, Hq, d]`` in ``q``'s dtype. CUDA tensors run the Triton kernel (fp32 online
        softmax) unless autograd needs a gradient or ``q`` is float64; others
        :func:`ratplus_decode_reference`.

    Example::

        keys, values, _ = layer_cache.entries()
        out = ratplus_decode(q[:, :, 0], layer_cache.keys, layer_cache.values, layer_cache.n_valid)
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and q.dtype != torch.float64 and use_triton(q, k, v):
        from tersa.kernels.ratplus_decode.triton import ratplus_decode_triton

        return ratplus_decode_triton(q, k, v, n, scale)
    return ratplus_decode_reference(q, k, v, n, scale)
