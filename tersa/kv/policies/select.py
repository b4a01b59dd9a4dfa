"""Which keys each decode-step query attends to under a policy: boolean masks, the reference math.

Every function works on positions, not slots: ``q_pos [Tq]`` and ``k_pos [Tk]`` are sequence
indices (a RAT+ compact cache holds a subset of positions; a full cache holds ``0 .. T−1``), so
pages and blocks are absolute (page ``i`` is positions ``[i·size, (i+1)·size)``) and never move as
the cache grows. Masks include causality (``k_pos <= q_pos``). Query heads select on their own;
with grouped KV heads, a query head reads KV head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tersa.kernels.quest_decode.reference import quest_share_scores
from tersa.kv.policies.config import (
    KVPolicy,
    MobaPolicy,
    QuestPolicy,
    SnapKVPolicy,
    StreamingPolicy,
)


def causal(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``[Tq, Tk]``: key position at or before the query's."""
    return k_pos[None, :] <= q_pos[:, None]


def budget_tokens(policy: KVPolicy, q_pos: torch.Tensor) -> torch.Tensor:
    """The budget in tokens of each query ``[Tq]`` (a fraction is of the ``t + 1`` keys it sees)."""
    if isinstance(policy.budget, float):
        return torch.ceil(policy.budget * (q_pos + 1).double()).long().clamp(min=1)
    return torch.minimum(torch.full_like(q_pos, policy.budget), q_pos + 1)


def streaming_mask(
    policy: StreamingPolicy, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """``[Tq, Tk]``: the first sinks plus the most recent keys, ``budget`` in all per query.

    When the budget is smaller than ``sinks + 1`` the sinks shrink: the query's own token stays.
    """
    budget = budget_tokens(policy, q_pos)  # [Tq]
    recent = torch.clamp(budget - policy.sinks, min=1)
    sinks = budget - recent
    keep = (k_pos[None, :] < sinks[:, None]) | (q_pos[:, None] - k_pos[None, :] < recent[:, None])
    return keep & causal(q_pos, k_pos)


def snapkv_keep(
    policy: SnapKVPolicy,
    q_obs: torch.Tensor,
    k_prompt: torch.Tensor,
    obs_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The prompt keys each KV head keeps: ``[B, Hkv, L]`` bool, once, at the end of the prompt.

    :param q_obs: the observation window's queries ``[B, Hq, w, d]`` at positions
        ``obs_pos [w]``, ascending, ending at or after the prompt's end (the window ends at the
        first decode query, which is the prompt's last token in a ``generate`` call).
    :param k_prompt: the prompt's keys ``[B, Hkv, L, d]`` at positions ``0 .. L − 1``.
    :returns: True for the prompt keys inside the window (``r`` of them: positions
        ``>= obs_pos[0]``) and, of the keys before it, the ``C − r`` with the highest votes,
        ``C = policy.tokens(L)``: each window query's softmax attention over the prompt, summed
        over the window, averaged over the query heads sharing a KV head, then averaged over
        ``pool`` neighbouring keys (so a kept key brings its neighbours' context along).
    """
    b, hq, _, _ = q_obs.shape
    hkv, length = k_prompt.shape[1], k_prompt.shape[2]
    capacity = policy.tokens(length) if length else 0
    keep = torch.zeros(b, hkv, length, dtype=torch.bool, device=k_prompt.device)
    if capacity >= length:
        return keep.fill_(True)
    recent = min(max(length - int(obs_pos[0]), 0), capacity)
    prefix = length - recent
    keep[:, :, prefix:] = True
    if capacity == recent:
        return keep
    k = k_prompt.repeat_interleave(hq // hkv, 1).float()  # [B, Hq, L, d]
    logits = torch.einsum("bhwd,bhld->bhwl", q_obs.float(), k) * scale
    allowed = causal(obs_pos, torch.arange(length, device=k.device))
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    votes = probs[..., :prefix].sum(2).view(b, hkv, hq // hkv, prefix).mean(2)  # [B, Hkv, prefix]
    if policy.pool > 1:
        pad = policy.pool // 2
        votes = F.avg_pool1d(
            votes.flatten(0, 1)[:, None],
            policy.pool,
            stride=1,
            padding=pad,
            count_include_pad=False,
        )[:, 0, :prefix].view(b, hkv, prefix)
    top = votes.topk(capacity - recent, -1).indices  # [B, Hkv, C − r]
    keep[:, :, :prefix].scatter_(-1, top, True)
    return keep


def group_pages(
    k: torch.Tensor, k_pos: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-page min, max, mean of the keys and the token count: ``[B, Hkv, P, d]`` ×3 and ``[P]``.

    Pages are absolute: page ``i`` holds positions ``[i·size, (i+1)·size)``; ``P`` covers the
    largest position. A page without cached tokens has count 0 (and meaningless statistics).
    """
    b, hkv, _, d = k.shape
    page_of = k_pos // size  # [Tk]
    n_pages = int(page_of.max()) + 1
    idx = page_of.view(1, 1, -1, 1).expand_as(k)
    kf = k.float()
    shape = (b, hkv, n_pages, d)
    kmin = kf.new_full(shape, float("inf")).scatter_reduce(2, idx, kf, "amin")
    kmax = kf.new_full(shape, float("-inf")).scatter_reduce(2, idx, kf, "amax")
    total = kf.new_zeros(shape).scatter_add(2, idx, kf)
    count = torch.bincount(page_of, minlength=n_pages)
    mean = total / count.clamp(min=1).view(1, 1, -1, 1).to(kf.dtype)
    return kmin, kmax, mean, count


def top_pages(
    scores: torch.Tensor, own: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``[B, Hq, Tq, P]`` bool: each query's own page plus its ``keep − 1`` best earlier pages.

    :param scores: page scores ``[B, Hq, Tq, P]``.
    :param own: the page holding each query ``[Tq]``.
    :param keep: pages to keep per query, own page included ``[Tq]``.
    :param valid: ``[P]`` pages holding cached tokens.
    Ties go to the lower page index (a stable sort), so selection is deterministic.
    """
    pages = torch.arange(scores.shape[-1], device=scores.device)
    candidate = (pages[None, :] < own[:, None]) & valid[None, :]  # [Tq, P]: earlier, non-empty
    ranked = scores.float().masked_fill(~candidate, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, pages.expand_as(order))
    chosen = (rank < (keep - 1)[:, None]) & candidate
    return chosen | (pages[None, :] == own[:, None])


def page_mask(
    policy: QuestPolicy | MobaPolicy,
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
) -> torch.Tensor:
    """``[B, Hq, Tq, Tk]``: Quest's or MoBA's selection for queries ``q [B, Hq, Tq, d]`` over
    keys ``k [B, Hkv, Tk, d]``; the budget in tokens is rounded up to whole pages."""
    size = policy.page if isinstance(policy, QuestPolicy) else policy.block
    group = q.shape[1] // k.shape[1]
    kmin, kmax, mean, count = group_pages(k, k_pos, size)
    qf = q.float()
    if isinstance(policy, QuestPolicy):
        # Σ_i max(q_i m_i, q_i M_i) = q·(M + m)/2 + |q|·(M − m)/2, two matmuls instead of a
        # [B, H, Tq, P, d] product
        centre = ((kmax + kmin) / 2).nan_to_num(0.0, 0.0, 0.0).repeat_interleave(group, 1)
        radius = ((kmax - kmin) / 2).nan_to_num(0.0, 0.0, 0.0).repeat_interleave(group, 1)
        scores = qf @ centre.transpose(-1, -2) + qf.abs() @ radius.transpose(-1, -2)
    else:
        scores = qf @ mean.repeat_interleave(group, 1).transpose(-1, -2)
    if policy.heads == "kv":
        scores = quest_share_scores(scores, k.shape[1])
    keep = torch.ceil(budget_tokens(policy, q_pos).double() / size).long()
    pages = top_pages(scores, q_pos // size, keep, count > 0)  # [B, Hq, Tq, P]
    token_page = (k_pos // size).view(1, 1, 1, -1).expand(*pages.shape[:3], -1)
    return torch.gather(pages, -1, token_page) & causal(q_pos, k_pos)


def pages_for_budget(policy: QuestPolicy | MobaPolicy, visible: int) -> int:
    """Pages (blocks) one query reads when it sees ``visible`` keys, its own included."""
    size = policy.page if isinstance(policy, QuestPolicy) else policy.block
    return min(math.ceil(policy.tokens(visible) / size), math.ceil(visible / size))
