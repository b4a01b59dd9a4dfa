"""Quest decode attention in pure torch: the spec of the Triton kernels, their oracle, the CPU path.

Quest (Tang et al., 2024, arXiv 2406.10774) cuts the KV cache into pages of ``page`` consecutive
tokens and keeps, per page and KV head, the element-wise min ``m`` and max ``M`` of its keys. A
decode query ``q`` bounds the score of every key ``k`` of a page from above by
``Σ_i max(q_i·m_i, q_i·M_i) >= q·k`` (each term bounds ``q_i·k_i`` since ``m_i <= k_i <= M_i``),
keeps the pages with the largest bounds per query head, and attends only to their tokens.
Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (grouped-query attention).
"""

from __future__ import annotations

import torch


def _check_q_fits(q: torch.Tensor, cache: torch.Tensor, what: str) -> None:
    """``q`` is ``[B, Hq, d]`` float and fits a ``[B, Hkv, *, d]`` cache-side tensor."""
    if q.dim() != 3 or not q.dtype.is_floating_point:
        raise ValueError(f"q must be a float tensor [B, Hq, d], got {q.dtype} {tuple(q.shape)}")
    b, hq, d = q.shape
    if cache.shape[0] != b or cache.shape[3] != d or hq % cache.shape[1] != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the {what} {tuple(cache.shape)}: batch and head_dim "
            "must match and Hq must be a multiple of Hkv"
        )


def check_cache_args(keys: torch.Tensor, length: int, page: int) -> None:
    """Raise ``ValueError`` unless ``keys`` is ``[B, Hkv, N, d]`` float, ``1 <= length <= N``,
    ``page >= 1``."""
    if keys.dim() != 4 or not keys.dtype.is_floating_point:
        raise ValueError(
            f"keys must be a float tensor [B, Hkv, N, d], got {keys.dtype} {tuple(keys.shape)}"
        )
    if not 1 <= length <= keys.shape[2]:
        raise ValueError(
            f"length must be in [1, {keys.shape[2]}] (the cache capacity), got {length}"
        )
    if page < 1:
        raise ValueError(f"page must be >= 1 (tokens per page), got {page}")


def check_scores_args(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``kmin``/``kmax`` share one ``[B, Hkv, P, d]`` shape fitting ``q``."""
    if kmin.dim() != 4 or kmin.shape != kmax.shape:
        raise ValueError(
            "kmin and kmax must share one shape [B, Hkv, P, d], got "
            f"{tuple(kmin.shape)} and {tuple(kmax.shape)}"
        )
    _check_q_fits(q, kmin, "page bounds")


def check_decode_args(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pages: torch.Tensor,
    length: int,
    page: int,
) -> None:
    """Raise ``ValueError`` naming the first argument whose shape or type does not fit.

    Shapes and dtypes only: checking the page indices themselves would cost the Triton path a
    host sync per decode step (see :func:`check_page_indices`).
    """
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            "keys and values must share one shape [B, Hkv, N, d], got "
            f"{tuple(keys.shape)} and {tuple(values.shape)}"
        )
    _check_q_fits(q, keys, "cache")
    check_cache_args(keys, length, page)
    if pages.dim() != 3 or pages.shape[:2] != q.shape[:2] or pages.dtype != torch.int64:
        raise ValueError(
            f"pages must be an int64 tensor [B, Hq, k] for q {tuple(q.shape)}, got "
            f"{pages.dtype} {tuple(pages.shape)}"
        )


def check_page_indices(pages: torch.Tensor, n_pages_total: int) -> None:
    """Raise ``ValueError`` unless every row of ``pages`` holds distinct indices in ``[0, P)``.

    Both paths walk the list, so a repeated page would weigh its tokens twice: no attention over
    a set of tokens any more. An index outside ``[0, P)`` selects no valid token.
    """
    if pages.numel() == 0:
        return
    if int(pages.min()) < 0 or int(pages.max()) >= n_pages_total:
        raise ValueError(
            f"pages must hold page indices in [0, {n_pages_total}) (P = ceil(length / page))"
        )
    ordered = pages.sort(-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("pages must not repeat a page index within one query head")


def n_pages_of(length: int, page: int) -> int:
    """``P = ceil(length / page)``: the pages holding tokens ``[0, length)``."""
    return -(-length // page)


def quest_page_bounds(
    keys: torch.Tensor, length: int, page: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max of the keys of every page.

    Stays in torch on every device: a cache computes the bounds of a page once, when it fills
    (only the last, partial page changes per step), so this is not on the per-step hot path.

    :param keys: ``[B, Hkv, N, d]``; only tokens ``[0, length)`` are read.
    :param length: valid tokens, ``1 <= length <= N``.
    :param page: tokens per page, ``>= 1``.
    :returns: ``(kmin, kmax)``, each ``[B, Hkv, P, d]`` float32 with ``P = ceil(length / page)``;
        the last page covers only its valid tokens.
    """
    check_cache_args(keys, length, page)
    b, hkv, _, d = keys.shape
    p = n_pages_of(length, page)
    k = keys[:, :, :length].float()  # [B, Hkv, length, d]
    pad = (0, 0, 0, p * page - length)  # the tail of the last page: neutral for min / max
    lo = torch.nn.functional.pad(k, pad, value=float("inf")).view(b, hkv, p, page, d)
    hi = torch.nn.functional.pad(k, pad, value=float("-inf")).view(b, hkv, p, page, d)
    return lo.amin(3), hi.amax(3)


def quest_page_scores_reference(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor
) -> torch.Tensor:
    """Upper bounds ``Σ_i max(q_i·m_i, q_i·M_i)`` of ``q·k`` over the keys of each page.

    :param q: queries ``[B, Hq, d]``.
    :param kmin: page minima ``[B, Hkv, P, d]`` (:func:`quest_page_bounds`).
    :param kmax: page maxima ``[B, Hkv, P, d]``.
    :returns: ``[B, Hq, P]`` float32, without the softmax scale (computed in float64 for float64
        ``q``).
    """
    check_scores_args(q, kmin, kmax)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // kmin.shape[1]
    qq = q.to(dt)[:, :, None, :]  # [B, Hq, 1, d]
    lo = kmin.to(dt).repeat_interleave(group, 1)  # [B, Hq, P, d]
    hi = kmax.to(dt).repeat_interleave(group, 1)
    return torch.maximum(qq * lo, qq * hi).sum(-1).float()


def quest_share_scores(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Each query head's page scores replaced by their sum over its KV head's group, so that
    every head of a group selects the same pages (one page set per KV head).

    :param scores: ``[B, Hq, ..., P]`` page scores; query head ``h`` reads KV head
        ``h // (Hq // kv_heads)``.
    :returns: the same shape.
    """
    group = scores.shape[1] // kv_heads
    if group == 1:
        return scores
    return scores.unflatten(1, (kv_heads, group)).sum(2).repeat_interleave(group, 1)


def quest_select(scores: torch.Tensor, n_pages: int) -> torch.Tensor:
    """The pages each query head attends to: the last page plus the best-scored others.

    Stays in torch on every device: one sort over ``P`` bounds per head is small next to reading
    the pages, and a stable sort gives the deterministic tie order below.

    :param scores: ``[B, Hq, P]`` page bounds (:func:`quest_page_scores`).
    :param n_pages: pages per query head, ``>= 1``.
    :returns: ``[B, Hq, k]`` int64 page indices in ascending order, ``k = min(n_pages, P)``: page
        ``P - 1`` (it holds the current token) and the ``k - 1`` best scores among pages
        ``0 .. P - 2``, equal scores going to the lower index.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be a tensor [B, Hq, P], got {tuple(scores.shape)}")
    if n_pages < 1:
        raise ValueError(f"n_pages must be >= 1, got {n_pages}")
    p = scores.shape[-1]
    k = min(n_pages, p)
    # stable descending sort: equal bounds keep index order, so the lower page wins the tie
    order = scores[..., : p - 1].sort(dim=-1, descending=True, stable=True).indices  # [B, Hq, P-1]
    last = torch.full((*scores.shape[:2], 1), p - 1, dtype=torch.int64, device=scores.device)
    return torch.cat([order[..., : k - 1], last], -1).sort(-1).values


def quest_decode_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pages: torch.Tensor,
    length: int,
    page: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v`` over the tokens of the selected pages that are ``< length``.

    Gathers the selected tokens, so the CPU path reads ``k·page`` keys per head, not ``length``.

    :param q: queries ``[B, Hq, d]`` (post-RoPE).
    :param keys: ``[B, Hkv, N, d]``; tokens ``length ..`` are ignored.
    :param values: ``[B, Hkv, N, d]``.
    :param pages: ``[B, Hq, k]`` int64, distinct page indices in ``[0, P)`` per query head.
    :param length: valid tokens, ``1 <= length <= N``.
    :param page: tokens per page.
    :param scale: softmax scale; ``d ** -0.5`` when None.
    :returns: ``[B, Hq, d]`` in ``q``'s dtype, computed in float32 (float64 for float64 ``q``).
    """
    check_decode_args(q, keys, values, pages, length, page)
    check_page_indices(pages, n_pages_of(length, page))
    b, hq, d = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if scale is None else scale
    tokens = pages[..., None] * page + torch.arange(page, device=q.device)  # [B, Hq, k, page]
    tokens = tokens.flatten(2)  # [B, Hq, T], T = k·page
    valid = tokens < length  # the last page may be partial
    rows = torch.arange(b, device=q.device)[:, None, None]
    heads = (torch.arange(hq, device=q.device) // (hq // keys.shape[1]))[None, :, None]
    at = tokens.clamp(max=length - 1)  # any valid index: masked below
    kk, vv = keys[rows, heads, at].to(dt), values[rows, heads, at].to(dt)  # [B, Hq, T, d]
    s = torch.einsum("bhd,bhtd->bht", q.to(dt), kk) * scale
    s = s.masked_fill(~valid, float("-inf"))
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), vv).to(q.dtype)
