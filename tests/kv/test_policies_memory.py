"""Bytes kept and read per decode step, by hand on a small layout."""

from __future__ import annotations

import pytest

from tersa.kv.policies import make_policy
from tersa.kv.policies.memory import KVLayout, kv_traffic
from tersa.models.tiny import tiny_model
from tests.kv.helpers import tiny_ratplus

# 2 layers, 4 query heads over 2 KV heads of 8, 2-byte numbers: an entry is 2·2·8·2 = 64 bytes
LAYOUT = KVLayout(layers=2, q_heads=4, kv_heads=2, head_dim=8, dtype_bytes=2)
ENTRY = 64


@pytest.mark.parametrize(
    ("policy", "kept", "read"),
    [
        ({"name": "dense"}, 100, 100),
        ({"name": "streaming", "budget": 0.25}, 25, 25),
        ({"name": "snapkv", "budget": 40}, 40, 40),
        # 25 keys -> 2 pages of 16 = 32 keys, read by both query heads of a KV head; 7 pages
        # of bounds, one entry each
        ({"name": "quest", "budget": 0.25, "page": 16}, 107, 2 * 32 + 7),
        # heads: kv, one selection per KV head: the pages are read once
        ({"name": "quest", "budget": 0.25, "page": 16, "heads": "kv"}, 107, 32 + 7),
        # 25 keys -> 1 block of 32 read twice; 4 block means, half an entry each
        ({"name": "moba", "budget": 0.25, "block": 32}, 102, 2 * 32 + 2),
    ],
)
def test_traffic_by_hand(policy: dict, kept: int, read: int) -> None:
    traffic = kv_traffic(make_policy(policy), LAYOUT, 100)
    assert traffic.dense_bytes == 2 * 100 * ENTRY
    assert (traffic.kept_bytes, traffic.read_bytes) == (2 * kept * ENTRY, 2 * read * ENTRY)


def test_dense_layers_count_in_full() -> None:
    policy = make_policy({"name": "streaming", "budget": 10, "dense_layers": 1})
    traffic = kv_traffic(policy, LAYOUT, 100)
    assert traffic.kept_bytes == (100 + 10) * ENTRY


def test_layout_of_models() -> None:
    llama = KVLayout.of(tiny_model("llama"))
    assert (llama.layers, llama.q_heads, llama.kv_heads, llama.head_dim) == (2, 4, 2, 16)
    assert llama.entry_bytes == 2 * 2 * 16 * 4 and llama.state_bytes == 0
    rat = KVLayout.of(tiny_ratplus())
    assert rat.state_bytes == 2 * 2 * 12 * 4  # cat(k̃, ṽ) in float32 per KV head
