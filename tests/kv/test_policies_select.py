"""KV policy selections against brute-force loops on small tensors, and the config rules."""

from __future__ import annotations

import math

import pytest
import torch

from tersa.errors import RecipeError
from tersa.kv.policies import (
    MobaPolicy,
    QuestPolicy,
    SnapKVPolicy,
    StreamingPolicy,
    make_policy,
)
from tersa.kv.policies.select import page_mask, snapkv_keep, streaming_mask


def qk(b: int, hq: int, hkv: int, tq: int, tk: int, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, tq, d, generator=gen), torch.randn(b, hkv, tk, d, generator=gen)


@pytest.mark.parametrize("budget", [1, 3, 5, 9, 0.3, 1.0])
def test_streaming_matches_brute_force(budget) -> None:
    policy = StreamingPolicy(budget=budget, sinks=2)
    q_pos, k_pos = torch.arange(6, 14), torch.arange(14)
    mask = streaming_mask(policy, q_pos, k_pos)
    for i, t in enumerate(q_pos.tolist()):
        n = min(budget, t + 1) if isinstance(budget, int) else math.ceil(budget * (t + 1))
        recent = max(n - 2, 1)
        sinks = n - recent
        want = {j for j in range(t + 1) if j < sinks or t - j < recent}
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == want
        assert len(want) == n  # the budget is spent exactly


def brute_pages(policy, q, k, q_pos, k_pos):
    """Per query and head: score each earlier page by the rule (summed over the heads of the KV
    head's group with ``heads: kv``), keep the best ones plus its own."""
    size = policy.page if isinstance(policy, QuestPolicy) else policy.block
    b, hq, tq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, hq, tq, k_pos.numel(), dtype=torch.bool)

    def score(qv, ks):
        if isinstance(policy, QuestPolicy):
            lo, hi = ks.min(0).values, ks.max(0).values
            return torch.maximum(qv * lo, qv * hi).sum()
        return qv @ ks.mean(0)

    for bi in range(b):
        for h in range(hq):
            keys = k[bi, h // group]
            scorers = [h]
            if policy.heads == "kv":
                scorers = list(range(h // group * group, (h // group + 1) * group))
            for i, t in enumerate(q_pos.tolist()):
                own = t // size
                budget = policy.tokens(t + 1)
                keep = math.ceil(budget / size)
                scored = []
                for p in range(own):
                    ks = keys[(k_pos // size) == p]
                    if ks.numel() == 0:
                        continue
                    s = sum(float(score(q[bi, g, i], ks)) for g in scorers)
                    scored.append((-s, p))
                chosen = {p for _, p in sorted(scored)[: keep - 1]} | {own}
                for j, pos in enumerate(k_pos.tolist()):
                    out[bi, h, i, j] = pos <= t and pos // size in chosen
    return out


@pytest.mark.parametrize("cls", [QuestPolicy, MobaPolicy])
@pytest.mark.parametrize("budget", [0.25, 7, 1.0])
@pytest.mark.parametrize("heads", ["query", "kv"])
def test_page_selection_matches_brute_force(cls, budget, heads: str) -> None:
    size_field = "page" if cls is QuestPolicy else "block"
    policy = cls(budget=budget, heads=heads, **{size_field: 4})
    q, k = qk(2, 6, 2, 5, 23)  # groups of 3 query heads
    q_pos, k_pos = torch.arange(18, 23), torch.arange(23)
    got = page_mask(policy, q, k, q_pos, k_pos)
    assert torch.equal(got, brute_pages(policy, q, k, q_pos, k_pos))
    groups = got.unflatten(1, (2, 3))  # [B, Hkv, G, Tq, Tk]
    shared = bool((groups == groups[:, :, :1]).all())
    assert shared == (heads == "kv" or budget == 1.0)  # query heads differ on these random q


def test_kv_head_selection_reads_the_budget_once_per_group() -> None:
    """With heads: kv a group's union of pages is one budget; per query head it is up to G."""
    q, k = qk(1, 8, 2, 1, 64, seed=7)
    q_pos, k_pos = torch.tensor([63]), torch.arange(64)
    for heads, most in (("kv", 16), ("query", 4 * 16)):
        mask = page_mask(QuestPolicy(budget=16, page=4, heads=heads), q, k, q_pos, k_pos)
        union = mask.unflatten(1, (2, 4)).any(2)  # [B, Hkv, Tq, Tk]: what each KV head serves
        assert int(union.sum(-1).max()) <= most
        if heads == "query":
            assert int(union.sum(-1).max()) > 16


def test_page_selection_over_a_sparse_cache() -> None:
    """Positions with gaps (a RAT+ dilated cache): empty pages are never chosen."""
    policy = QuestPolicy(budget=8, page=4)
    k_pos = torch.tensor([0, 1, 3, 9, 10, 17, 19, 20, 21])
    q, k = qk(1, 2, 2, 1, k_pos.numel(), seed=3)
    q_pos = torch.tensor([21])
    got = page_mask(policy, q, k, q_pos, k_pos)
    assert torch.equal(got, brute_pages(policy, q, k, q_pos, k_pos))


def test_quest_bound_is_an_upper_bound() -> None:
    q, k = qk(1, 1, 1, 1, 16, d=6, seed=5)
    lo, hi = k[0, 0].min(0).values, k[0, 0].max(0).values
    bound = torch.maximum(q[0, 0, 0] * lo, q[0, 0, 0] * hi).sum()
    assert bool((k[0, 0] @ q[0, 0, 0] <= bound + 1e-6).all())


@pytest.mark.parametrize("budget", [0.5, 6, 1.0])
@pytest.mark.parametrize("past_end", [0, 1])
def test_snapkv_matches_brute_force(budget, past_end: int) -> None:
    """The window's queries end at the prompt's end (``past_end=0``) or one past it: the first
    decode query votes too, and only the window's prompt positions are kept as the window."""
    policy = SnapKVPolicy(budget=budget, window=3, pool=3)
    length, hq, hkv = 12, 4, 2
    q, k = qk(1, hq, hkv, 3, length, seed=7)
    obs = torch.arange(length - 3, length) + past_end
    keep = snapkv_keep(policy, q, k, obs, scale=0.5)
    capacity = policy.tokens(length)
    assert int(keep[0, 0].sum()) == min(capacity, length)
    if capacity >= length:
        assert bool(keep.all())
        return
    recent = 3 - past_end  # prompt positions inside the window
    prefix = length - recent
    for h in range(hkv):
        votes = torch.zeros(prefix)
        for g in range(2):
            for i, t in enumerate(obs.tolist()):
                logits = (k[0, h, : min(t + 1, length)] @ q[0, 2 * h + g, i]) * 0.5
                votes += torch.softmax(logits, 0)[:prefix] / 2
        pooled = torch.stack(
            [votes[max(j - 1, 0) : j + 2].mean() for j in range(prefix)]
        )  # avg pool of 3, no padding counted
        want = set(pooled.topk(capacity - recent).indices.tolist()) | set(range(prefix, length))
        assert set(torch.nonzero(keep[0, h]).flatten().tolist()) == want


def test_make_policy_messages() -> None:
    assert make_policy({"name": "quest", "budget": 0.125, "page": 8}) == QuestPolicy(
        0.125, 0, 8, "query"
    )
    assert make_policy(None).name == "dense"
    with pytest.raises(RecipeError) as err:
        make_policy({"name": "h2o"})
    assert (
        str(err.value) == "unknown KV policy 'h2o'; allowed: dense, streaming, snapkv, quest, moba"
    )
    with pytest.raises(RecipeError) as err:
        make_policy({"name": "quest", "block": 8})
    assert str(err.value) == (
        "unknown option(s) block for KV policy 'quest'; allowed: budget, dense_layers, page, heads"
    )
    with pytest.raises(RecipeError) as err:
        make_policy({"name": "moba", "heads": "all"})
    assert str(err.value) == "moba.heads must be one of 'query', 'kv', got 'all'"
    with pytest.raises(RecipeError, match=r"a fractional budget must be in \(0, 1\], got 1.5"):
        make_policy({"name": "streaming", "budget": 1.5})
    with pytest.raises(RecipeError, match="a token budget must be >= 1, got 0"):
        make_policy({"name": "streaming", "budget": 0})
    with pytest.raises(RecipeError, match=r"quest\.page must be >= 1, got 0"):
        make_policy({"name": "quest", "page": 0})
