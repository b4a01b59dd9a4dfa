"""Quest decode attention: query-aware selection of KV pages by min/max key bounds (arXiv 2406.10774).

A decode step is :func:`quest_page_bounds` (kept per page by a cache), :func:`quest_page_scores`
(an upper bound of ``q·k`` per page), :func:`quest_select` (the last page plus the best others) and
:func:`quest_decode` (attention over the selected pages); :func:`quest_attention` chains them.
"""

from __future__ import annotations

import torch

from tersa.kernels.dispatch import use_triton
from tersa.kernels.quest_decode.reference import (
    quest_decode_reference,
    quest_page_bounds,
    quest_page_scores_reference,
    quest_select,
    quest_share_scores,
)

__all__ = [
    "quest_attention",
    "quest_decode",
    "quest_decode_reference",
    "quest_page_bounds",
    "quest_page_scores",
    "quest_page_scores_reference",
    "quest_select",
    "quest_share_scores",
]


def _runs_triton(q: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors, unless autograd needs a gradient or ``q`` is float64."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, *tensors))
    return not needs_grad and q.dtype != torch.float64 and use_triton(q, *tensors)


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bounds ``Σ_i max(q_i·m_i, q_i·M_i)`` of ``q·k`` over the keys of each page.

    :param q: queries ``[B, Hq, d]`` (post-RoPE), float; query head ``h`` reads KV head
        ``h // (Hq // Hkv)``.
    :param kmin: page minima ``[B, Hkv, P, d]`` from :func:`quest_page_bounds`.
    :param kmax: page maxima ``[B, Hkv, P, d]``.
    :returns: ``[B, Hq, P]`` float32, no softmax scale. CUDA tensors run the Triton kernel (same
        rule as :func:`quest_decode`); others :func:`quest_page_scores_reference`.
    """
    if _runs_triton(q, kmin, kmax):
        from tersa.kernels.quest_decode.triton import quest_page_scores_triton

        return quest_page_scores_triton(q, kmin, kmax)
    return quest_page_scores_reference(q, kmin, kmax)


def quest_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pages: torch.Tensor,
    length: int,
    page: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v`` over the tokens of the selected pages, tokens ``>= length`` excluded.

    :param q: queries ``[B, Hq, d]`` (post-RoPE), float; ``Hq`` a multiple of ``Hkv``.
    :param keys: ``[B, Hkv, N, d]``; only tokens ``[0, length)`` are read.
    :param values: ``[B, Hkv, N, d]``.
    :param pages: ``[B, Hq, k]`` int64, distinct page indices in ``[0, P)``, ``P =
        ceil(length / page)`` (:func:`quest_select`); page ``j`` holds tokens
        ``[j·page, (j+1)·page)``.
    :param length: valid tokens, ``1 <= length <= N``.
    :param page: tokens per page, ``>= 1``.
    :param scale: softmax scale, ``d ** -0.5`` when None.
    :returns: ``[B, Hq, d]`` in ``q``'s dtype. CUDA tensors run the Triton kernel (fp32 online
        softmax; page indices unchecked) unless autograd needs a gradient or ``q`` is float64;
        others :func:`quest_decode_reference`.

    Example::

        kmin, kmax = quest_page_bounds(keys, length, 16)
        pages = quest_select(quest_page_scores(q, kmin, kmax), n_pages=64)
        out = quest_decode(q, keys, values, pages, length, 16)
    """
    if _runs_triton(q, keys, values, pages):
        from tersa.kernels.quest_decode.triton import quest_decode_triton

        return quest_decode_triton(q, keys, values, pages, length, page, scale)
    return quest_decode_reference(q, keys, values, pages, length, page, scale)


def quest_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: int,
    page: int,
    n_pages: int,
    scale: float | None = None,
    per_kv_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Quest decode step from the raw cache: bounds, scores, selection, sparse attention.

    Recomputes every page's bounds (a pass over all keys); a serving cache keeps them instead and
    calls the three steps itself. Arguments as in :func:`quest_decode`, ``n_pages >= 1`` pages
    per query head; with ``per_kv_head`` the heads of a group share one selection, made on their
    summed scores (:func:`quest_share_scores`).

    :returns: ``(out [B, Hq, d] in q's dtype, pages [B, Hq, min(n_pages, P)] int64)``.
    """
    kmin, kmax = quest_page_bounds(keys, length, page)
    scores = quest_page_scores(q, kmin, kmax)
    if per_kv_head:
        scores = quest_share_scores(scores, keys.shape[1])
    pages = quest_select(scores, n_pages)
    return quest_decode(q, keys, values, pages, length, page, scale), pages
