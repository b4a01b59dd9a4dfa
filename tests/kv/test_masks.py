"""Pattern masks against a brute force, pattern parsing, and the cache size formula."""

from __future__ import annotations

import pytest
import torch

from tersa.kv.masks import KVPattern, cache_entries, layer_patterns, pattern_mask, sees

PATTERNS = [
    KVPattern(),  # dense
    KVPattern(dilation=4, window=2),
    KVPattern(dilation=3, window=0, sinks=2),
    KVPattern(dilation=5, window=4, sinks=7),  # sinks past the first grid point
    KVPattern(dilation=None, window=5, sinks=2),  # StreamingLLM
    KVPattern(dilation=None, window=0),
]


def brute_force(t: int, j: int, d: int | None, w: int, p: int) -> bool:
    """The RAT+ predicate as the paper's code writes it (``merge_lastt.py``)."""
    causal = t >= j
    block = d is not None and (j + 1) % d == 0
    local_prefix = (t - j <= w) or (j < p)
    return (local_prefix or block) and causal


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_mask_matches_brute_force(pattern: KVPattern) -> None:
    length = 41
    pos = torch.arange(length)
    mask = pattern_mask(pos, pos, pattern)
    for t in range(length):
        for j in range(length):
            want = brute_force(t, j, pattern.dilation, pattern.window, pattern.sinks)
            assert bool(mask[t, j]) == want == sees(t, j, pattern), (t, j)


def test_mask_for_queries_after_a_cache() -> None:
    pattern = KVPattern(dilation=4, window=2, sinks=1)
    q_pos, k_pos = torch.arange(20, 25), torch.tensor([0, 3, 7, 11, 15, 18, 19, 20, 21, 22, 23, 24])
    mask = pattern_mask(q_pos, k_pos, pattern)
    for i, t in enumerate(q_pos.tolist()):
        for c, j in enumerate(k_pos.tolist()):
            assert bool(mask[i, c]) == sees(t, j, pattern)


def test_dilated_states_sit_on_an_absolute_grid() -> None:
    pattern = KVPattern(dilation=4, window=0)
    seen = [j for j in range(30) if sees(29, j, pattern)]
    assert seen == [3, 7, 11, 15, 19, 23, 27, 29]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_cache_entries_formula(pattern: KVPattern) -> None:
    p, w, d = pattern.sinks, pattern.window, pattern.dilation
    for tokens in range(0, 60):
        # what the next query (position `tokens`) and later ones can still see, plus the ring
        # slot of the oldest window position (held until the next token replaces it)
        stored = {
            j
            for j in range(tokens)
            if j < p or j >= tokens - w - 1 or (d is not None and (j + 1) % d == 0)
        }
        assert cache_entries(tokens, pattern) == len(stored), tokens
        if d is not None:
            assert cache_entries(tokens, pattern) <= p + w + 1 + tokens // d


def test_cache_entries_examples() -> None:
    assert cache_entries(1000, KVPattern()) == 1000
    # 1 sink + 5 ring + the multiples of 16 in (1, 994]: 62
    assert cache_entries(1000, KVPattern(dilation=16, window=4, sinks=1)) == 1 + 5 + 62
    assert cache_entries(1000, KVPattern(dilation=None, window=63, sinks=4)) == 4 + 64
    assert cache_entries(3, KVPattern(dilation=16, window=4, sinks=4)) == 3


def test_pattern_parsing_and_errors() -> None:
    assert KVPattern.from_value(None) == KVPattern.from_value("dense") == KVPattern()
    assert KVPattern.from_value({"dilation": 8}) == KVPattern(8, 4, 0)
    assert layer_patterns([None, {"dilation": 2}], 2)[1].dilation == 2
    assert layer_patterns({"window": 3, "dilation": None}, 3) == [KVPattern(None, 3)] * 3
    with pytest.raises(ValueError, match="dilation must be an int >= 1 or None, got 0"):
        KVPattern(dilation=0)
    with pytest.raises(ValueError, match="window must be an int >= 0, got -1"):
        KVPattern(window=-1)
    with pytest.raises(ValueError, match="sinks must be an int >= 0"):
        KVPattern(sinks=-2)
    with pytest.raises(ValueError, match=r"unknown KV pattern keys \['stride'\]"):
        KVPattern.from_value({"stride": 4})
    with pytest.raises(ValueError, match="a per-layer KV pattern list needs 3 entries, got 2"):
        layer_patterns([None, None], 3)
