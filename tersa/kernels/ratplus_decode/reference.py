"""RAT+ decode attention in pure torch: the spec of the Triton kernel, its test oracle and the CPU path.

One query token per sequence attends to the first ``n`` entries of a compact cache
(:class:`tersa.kv.cache.RatPlusLayerCache`: sinks, the local ring and the dilated states, already
rotated). The pattern is in the cache layout, so the kernel is dense attention over that prefix,
with grouped query heads (``Hq`` a multiple of ``Hkv``).
"""

from __future__ import annotations

import torch


def check_decode_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
    """Raise ``ValueError`` naming the first argument whose shape does not fit."""
    if q.dim() != 3 or not q.dtype.is_floating_point:
        raise ValueError(f"q must be a float tensor [B, Hq, d], got {q.dtype} {tuple(q.shape)}")
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"k and v must share one shape [B, Hkv, N, d], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1] != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the cache {tuple(k.shape)}: batch and head_dim must "
            "match and Hq must be a multiple of Hkv"
        )
    if not 1 <= n <= k.shape[2]:
        raise ValueError(f"n must be in [1, {k.shape[2]}] (the cache capacity), got {n}")


def ratplus_decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float | None = None
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v`` over cache entries ``[0, n)``, per query head.

    :param q: queries ``[B, Hq, d]`` (post-RoPE).
    :param k: keys ``[B, Hkv, N, d]``; entries ``n ..`` are ignored.
    :param v: values ``[B, Hkv, N, d]``.
    :param n: valid entries.
    :param scale: softmax scale; ``d ** -0.5`` when None.
    :returns: ``[B, Hq, d]`` in ``q``'s dtype, computed in float32 (float64 for float64 ``q``).
    """
    check_decode_args(q, k, v, n)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = k[:, :, :n].to(dt).repeat_interleave(group, 1)  # [B, Hq, n, d]
    vv = v[:, :, :n].to(dt).repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhnd->bhn", q.to(dt), kk) * scale
    out = torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), vv)
    return out.to(q.dtype)
