"""The compact decode cache holds exactly what the pattern needs, whatever the insert order."""

from __future__ import annotations

import pytest
import torch

from tersa.kv.cache import RatPlusCache, RatPlusLayerCache
from tersa.kv.masks import KVPattern, cache_entries, sees

PATTERNS = [
    KVPattern(),
    KVPattern(dilation=4, window=2),
    KVPattern(dilation=3, window=0, sinks=2),
    KVPattern(dilation=5, window=4, sinks=7),
    KVPattern(dilation=None, window=5, sinks=2),
]


def token_kv(positions: range, batch: int = 2, heads: int = 3, dim: int = 4):
    """Entries whose every element encodes its position (value = -position)."""
    pos = torch.tensor(list(positions), dtype=torch.float32)
    k = pos.view(1, 1, -1, 1).expand(batch, heads, -1, dim).clone()
    return k, -k


def stored(cache: RatPlusLayerCache) -> list[int]:
    entries = cache.entries()
    assert entries is not None
    k, v, pos = entries
    # every slot holds the entry of the position it is labelled with
    assert torch.equal(k[0, 0, :, 0], pos.float()) and torch.equal(v[1, 2, :, 3], -pos.float())
    return sorted(pos.tolist())


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_decode_cache_holds_exactly_what_the_query_sees(pattern: KVPattern) -> None:
    cache = RatPlusLayerCache(pattern)
    for t in range(45):
        k, v = token_kv(range(t, t + 1))
        cache.append_one(k, v, None)
        assert stored(cache) == [j for j in range(t + 1) if sees(t, j, pattern)], t
        assert cache.n_valid == cache_entries(t + 1, pattern)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("splits", [[45], [1, 44], [13, 1, 1, 30], [6, 7, 8, 24]])
def test_bulk_inserts_match_single_inserts(pattern: KVPattern, splits: list[int]) -> None:
    one, many = RatPlusLayerCache(pattern), RatPlusLayerCache(pattern)
    start = 0
    for size in splits:
        many.append_many(*token_kv(range(start, start + size)), None)
        for t in range(start, start + size):
            one.append_one(*token_kv(range(t, t + 1)), None)
        start += size
        assert stored(many) == stored(one)
    k, _ = token_kv(range(45, 46))
    many.append_one(k, -k, None)  # decode continues after a bulk insert
    one.append_one(k, -k, None)
    assert stored(many) == stored(one)


def test_kv_bytes_counts_entries_and_state() -> None:
    pattern = KVPattern(dilation=4, window=2, sinks=1)
    cache = RatPlusCache([pattern, KVPattern()])
    state = torch.zeros(2, 3, 8)  # [B, Hkv, 2d] float32
    for layer in cache.layers:
        layer.append_many(*token_kv(range(30)), state)
    per_entry = 2 * 2 * 3 * 4 * 4  # k and v, B, Hkv, d, fp32
    want = (cache_entries(30, pattern) + 30) * per_entry + 2 * state.numel() * 4
    assert cache.kv_bytes() == want
    assert cache.get_seq_length() == 30 and cache.is_linear == [False, False]


def test_dilated_segment_grows() -> None:
    cache = RatPlusLayerCache(KVPattern(dilation=1, window=0))
    for t in range(70):
        cache.append_one(*token_kv(range(t, t + 1)), None)
    assert stored(cache) == list(range(70))


def test_reorder_and_crop() -> None:
    cache = RatPlusCache([KVPattern(dilation=2, window=1)])
    k, v = token_kv(range(5))
    k = k * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    cache[0].append_many(k, v, torch.randn(2, 3, 8))
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache[0].keys[0], cache[0].keys[1])
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
